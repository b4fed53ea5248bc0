"""The soak's books: every turn a client sent and how it ended, the faults
and when they were over, resumes, errors by code and close codes; and the
summary that benchmarks/soak.py prints.

A turn is one typed text, one utterance the server closed (speech.stopped),
or one MQTT ask. It is `answered` by reply.done (or a reply.cancelled with
reason barge_in or continued: the user spoke over it or went on, which the
server answers by design);
anything else (an error event, no outcome within the turn timeout, the
connection or the broker going away) is a failure. A failure whose lifetime
(sent to failed) overlaps the window of a fault that can touch it (the engine
worker killed: every turn; mosquitto restarted: MQTT asks) is counted
`in_flight_at_fault`; every other failure is `lost`. Only the turns of
well-behaved clients (they read everything and stay) are in these counts; the
others (never read, vanish mid-reply) are counted apart."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

# which fault kinds can make a turn of each kind fail
AFFECTS = {
    "engine": {"speech", "text", "resume", "webrtc", "mqtt"},
    "mosquitto": {"mqtt"},
    "postgres": set(),  # conversations are saved to it; turns must not depend on it
}
# a reply cancelled because the user spoke over it, or went on speaking (the
# whole span answered as one turn), is the server's answer by design
ANSWERED = {"answered", "cancelled:barge_in", "cancelled:continued"}
GRACE_S = 5.0  # after a fault has recovered, reconnects may still be settling


@dataclass
class Turn:
    kind: str  # speech | text | resume | webrtc | mqtt
    client: str
    sent: float
    ended: float | None = None
    outcome: str = ""  # answered | cancelled:REASON | error:CODE | timeout | closed:CODE
    latency_s: float | None = None


@dataclass
class Fault:
    kind: str
    start: float
    end: float | None = None  # recovered
    detail: str = ""


@dataclass
class Ledger:
    t0: float = field(default_factory=time.monotonic)
    turns: list[Turn] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    closes: Counter[str] = field(default_factory=Counter)
    close_causes: Counter[str] = field(default_factory=Counter)
    close_detail: list[dict[str, Any]] = field(default_factory=list)  # well-behaved ones
    resumes: Counter[str] = field(default_factory=Counter)
    failed_resumes: list[dict[str, Any]] = field(default_factory=list)
    misbehaving: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    timing: dict[str, list[float]] = field(default_factory=dict)  # reply.done's, ms

    def now(self) -> float:
        return time.monotonic() - self.t0

    def begin(self, kind: str, client: str, at: float | None = None) -> Turn:
        turn = Turn(kind, client, self.now() if at is None else at)
        self.turns.append(turn)
        return turn

    def end(self, turn: Turn, outcome: str) -> None:
        if turn.ended is not None:
            return
        turn.ended = self.now()
        turn.outcome = outcome
        if outcome == "answered":
            turn.latency_s = turn.ended - turn.sent
        if outcome.startswith("error:"):
            self.errors[outcome[6:]] += 1

    def timed(self, timing: dict[str, float]) -> None:
        """A reply.done's timing (queue_ms, ttft_ms, total_ms)."""
        for key, value in timing.items():
            self.timing.setdefault(key, []).append(float(value))

    def error(self, code: str) -> None:
        """An error event that ended no turn of a well-behaved client."""
        self.errors[code] += 1

    def closed(self, code: int | None, who: str, cause: str = "") -> None:
        self.closes[f"{who}:{code}"] += 1
        if cause:
            self.close_causes[f"{who}: {cause}"] += 1
        if who != "never_read" and len(self.close_detail) < 50:
            self.close_detail.append({"at_s": round(self.now(), 1), "who": who, "cause": cause})

    def resume(self, ok: bool, how: str, detail: dict[str, Any]) -> None:
        self.resumes[f"{how}:{'resumed' if ok else 'failed'}"] += 1
        if not ok:
            self.failed_resumes.append({"at_s": round(self.now(), 1), "how": how, **detail})

    def fault_started(self, kind: str, detail: str = "") -> Fault:
        fault = Fault(kind, self.now(), detail=detail)
        self.faults.append(fault)
        return fault

    def fault_over(self, fault: Fault) -> None:
        fault.end = self.now()

    # -- the summary --------------------------------------------------------

    def at_fault(self, turn: Turn) -> bool:
        end = turn.ended if turn.ended is not None else self.now()
        for f in self.faults:
            if turn.kind not in AFFECTS[f.kind]:
                continue
            f_end = (f.end if f.end is not None else self.now()) + GRACE_S
            if turn.sent <= f_end and end >= f.start:
                return True
        return False

    def close_open_turns(self, outcome: str = "timeout") -> None:
        for turn in self.turns:
            if turn.ended is None:
                self.end(turn, outcome)

    def summary(self) -> dict[str, Any]:
        kinds = sorted({t.kind for t in self.turns})
        by_kind: dict[str, dict[str, int]] = {}
        lost_detail: list[dict[str, Any]] = []
        totals: Counter[str] = Counter()
        outcomes: Counter[str] = Counter()
        for t in self.turns:
            c = by_kind.setdefault(t.kind, Counter())
            c["sent"] += 1
            outcomes[t.outcome or "open"] += 1
            if t.ended is None:
                c["open"] += 1
            elif t.outcome in ANSWERED:
                c["answered"] += 1
            elif self.at_fault(t):
                c["in_flight_at_fault"] += 1
            else:
                c["lost"] += 1
                if len(lost_detail) < 30:
                    lost_detail.append(
                        {
                            "kind": t.kind,
                            "client": t.client,
                            "sent_s": round(t.sent, 1),
                            "ended_s": round(t.ended or 0.0, 1),
                            "outcome": t.outcome,
                        }
                    )
        for k in kinds:
            by_kind[k] = {
                name: by_kind[k].get(name, 0)
                for name in ("sent", "answered", "in_flight_at_fault", "lost", "open")
            }
            totals.update(by_kind[k])
        lat = sorted(t.latency_s for t in self.turns if t.latency_s is not None)
        return {
            "sent": totals["sent"],
            "answered": totals["answered"],
            "in_flight_at_fault": totals["in_flight_at_fault"],
            "lost": totals["lost"],
            "open": totals["open"],  # in progress (0 once the run has ended)
            "by_kind": by_kind,
            "outcomes": dict(sorted(outcomes.items())),
            "lost_detail": lost_detail,
            "reply_latency_s": _quantiles(lat),
            "server_timing_ms": {k: _quantiles(sorted(v)) for k, v in self.timing.items()},
        }


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}

    def q(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 2)

    return {"p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": round(values[-1], 2)}
