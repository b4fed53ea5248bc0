"""Turn-taking as the user feels it: fragments answered, talk-over, reply delay.

Cases: benchmarks/turn_cases.py, the 221 cases of the five one-sentence
recordings in ../shared/audio (each sentence whole, and cut at each word
boundary with 0.5, 0.8 or 1.2 s of its own room tone inserted; see
benchmarks/turn_segments.py for how they were made and aligned).

Each case runs through the server's own code: the Session inside the
LiveSession driver, the scripted engine, a ReplySpeaker speaking with Piper
(the joe-us voice). Time is simulated (benchmarks/turn_sim.py): audio goes in
20 ms frames on a virtual clock at real-time pace; Piper's synthesis and the
end-of-turn model are charged to that clock at their measured cost on this
machine; the engine makes 10 ms a word. What is scored (benchmarks/
turn_felt.py): a fragment answered (the model never got the whole sentence
as one turn), talk-over (the reply's audio played while the user spoke, and
how long from their word until it stopped), and the last word to the first
reply audio.

Policies: the silence hangover (HANGOVERS_MS) and the end-of-turn model
(THRESHOLDS, one check at 200 ms of silence, 1500 ms at most), each without
continuation, and with it over continue windows and heard limits (family());
continuation runs only where SessionConfig has `continue_window_ms` (0: off).

The rule that picks the defaults: at most GOAL_FRAGMENTS of the cut cases
answered as fragments, then the lowest mean latency, then the smallest
window and heard limit (a longer one only joins more: a genuinely new turn
that follows a reply quickly would be joined too, which these cases do not
measure). Picked on four recordings and scored on the fifth (each in turn;
`held_out`), and on all five (`picked`). Goal: that, with a mean latency
under GOAL_LATENCY_MS, and talk-over stopped within GOAL_TALK_OVER_MS at p95.
`closest_under_goal_latency`: when nothing meets the rule, the fewest
fragments among the policies under GOAL_LATENCY_MS. `barge_in_variants`: the
picked (else that closest) policy with shorter barge-in lengths, which are
also how much resumed speech counts for continuation; not picked by, since
these cases have no echo of the assistant's voice (what the longer length
while the audio plays is for) and no coughs or clicks.

    python benchmarks/turns.py > docs/benchmarks/turns.json

writes the chart too (docs/benchmarks/turns.png). A few minutes on one core;
the first run with the model adds its calls (~100 ms each, a few thousand;
cached in --model-cache for the next run). --quick: one recording, a few
policies (the smoke test).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.turn_cases import PAUSES_MS, RATE, RECORDINGS, Case, build_cases
from benchmarks.turn_felt import Felt, by_recording, score, summarize
from benchmarks.turn_sim import REPLY, TOKEN_S, CachedDetector, CachedSpeech, Meter, simulate
from voice_agent import session_defaults as D
from voice_agent.session import SessionConfig
from voice_agent.vad import VadConfig

HANGOVERS_MS = (300, 400, 500, 600, 800, 1000, 1300)
THRESHOLDS = (0.5, 0.7, 0.9, 0.97)
# (continue window, heard limit): the session's first defaults, and longer ones
CONTINUE_GRID = ((1500, 600), (1500, 1000), (3000, 1500), (3000, 3000))
CONTINUE_HANGOVERS_MS = (300, 500, 600)
MODEL_CONTINUE = ((0.5, 3000, 3000), (0.97, 3000, 3000))  # (threshold, window, heard)
NAMED_HANGOVERS_MS = (300, 600, 1000, 1300)  # the rows
BARGE_INS_MS = ((300, 300), (200, 200), (100, 100))  # (barge_in_ms, ..._speaking_ms) tried
GOAL_FRAGMENTS, GOAL_LATENCY_MS, GOAL_TALK_OVER_MS = 0.01, 500.0, 300.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def continuation_available() -> bool:
    names = {f.name for f in dataclasses.fields(SessionConfig)}
    return {"continue_window_ms", "continue_heard_ms"} <= names


def _speech_check(window_ms: int, barge_in_ms: int) -> dict[str, Any]:
    """What the server adds for continuation (live_setup.speech_check: Silero
    confirms resumed speech when the VAD is webrtcvad), where it exists."""
    if "speech_check" not in {f.name for f in dataclasses.fields(SessionConfig)}:
        return {}
    from voice_agent.config import Config
    from voice_agent.live_setup import speech_check

    cfg = Config(continue_window_ms=window_ms, barge_in_ms=barge_in_ms)
    return {"speech_check": speech_check(cfg)}


@dataclass(frozen=True)
class Policy:
    hangover_ms: int | None = None  # silence; None: the model
    threshold: float | None = None  # the model's, at its first check
    window_ms: int = 0  # continuation off at 0
    heard_ms: int = 0
    barge_in_ms: int = D.BARGE_IN_MS
    barge_in_speaking_ms: int = D.BARGE_IN_SPEAKING_MS

    @property
    def base(self) -> str:
        if self.threshold is None:
            return f"silence {self.hangover_ms} ms"
        return f"model p>={self.threshold:g}"

    @property
    def name(self) -> str:
        name = self.base
        if self.window_ms:
            name += f", continue {self.window_ms}/{self.heard_ms} ms"
        if (self.barge_in_ms, self.barge_in_speaking_ms) != (D.BARGE_IN_MS, D.BARGE_IN_SPEAKING_MS):
            name += f", barge-in {self.barge_in_ms}/{self.barge_in_speaking_ms} ms"
        return name

    def config(self, detector: CachedDetector | None) -> SessionConfig:
        extra: dict[str, Any] = {
            "barge_in_ms": self.barge_in_ms,
            "barge_in_speaking_ms": self.barge_in_speaking_ms,
        }
        if continuation_available():
            extra |= {"continue_window_ms": self.window_ms, "continue_heard_ms": self.heard_ms}
            extra |= _speech_check(self.window_ms, self.barge_in_ms)
        if self.threshold is None:
            vad = VadConfig(hangover_ms=self.hangover_ms or D.HANGOVER_MS)
            return SessionConfig(vad=vad, **extra)
        vad = VadConfig(
            turn_check=True, min_silence_ms=D.MIN_SILENCE_MS, max_silence_ms=D.MAX_SILENCE_MS
        )
        return SessionConfig(
            vad=vad, turn_threshold=self.threshold, turn_detector=detector, **extra
        )

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"continue_window_ms": self.window_ms}
        if self.window_ms:
            out["continue_heard_ms"] = self.heard_ms
        out |= {"barge_in_ms": self.barge_in_ms, "barge_in_speaking_ms": self.barge_in_speaking_ms}
        if self.threshold is None:
            return {"hangover_ms": self.hangover_ms, **out}
        return {
            "turn_threshold": self.threshold,
            "min_silence_ms": D.MIN_SILENCE_MS,
            "max_silence_ms": D.MAX_SILENCE_MS,
            **out,
        }


def family(model: bool, quick: bool) -> list[Policy]:
    """Every hangover and threshold without continuation; with it, the
    shorter hangovers over CONTINUE_GRID, two thresholds at the longest
    (the model's mean latency stays far above the goal's). A finer grid
    (hangovers 300 to 800, windows 1000 to 3000, heard 600 to 3000) gave
    the same picture: docs/benchmarks/turns-grid.json."""
    out = [Policy(hangover_ms=h) for h in ((300, 600, 1300) if quick else HANGOVERS_MS)]
    thresholds = ((0.97,) if quick else THRESHOLDS) if model else ()
    out += [Policy(threshold=t) for t in thresholds]
    if not continuation_available():
        return out
    grid = ((2000, 1500),) if quick else CONTINUE_GRID
    for hangover in (300, 600) if quick else CONTINUE_HANGOVERS_MS:
        out += [Policy(hangover_ms=hangover, window_ms=w, heard_ms=h) for w, h in grid]
    model_grid = [(t, 2000, 1500) for t in thresholds] if quick else MODEL_CONTINUE
    out += [Policy(threshold=t, window_ms=w, heard_ms=h) for t, w, h in model_grid if model]
    return out


# ------------------------------------------------------------ picking


def pooled(result: dict[str, Any], recordings: Sequence[str]) -> dict[str, Any]:
    """A result's fragments and latency over `recordings` (from by_recording;
    each recording has one whole case, the rest are cut)."""
    by = [result["by_recording"][r] for r in recordings]
    cut = sum(b["cases"] - 1 for b in by)
    frags = sum(round(b["fragment_rate_cut"] * (b["cases"] - 1)) for b in by)
    lat = [b["latency_mean_ms"] for b in by]
    cases = sum(b["cases"] for b in by)
    weighted = [m * b["cases"] for m, b in zip(lat, by, strict=True) if m is not None]
    mean = None if None in lat else sum(weighted) / cases
    return {
        "fragment_rate_cut": round(frags / max(1, cut), 4),
        "latency_mean_ms": None if mean is None else round(mean, 1),
        "cases": cases,
    }


def _order(result: dict[str, Any], s: dict[str, Any]) -> tuple[float, int, int]:
    policy = result["policy"]
    window = policy.get("continue_window_ms", 0)
    return (
        s["latency_mean_ms"] or 1e9,
        window,
        policy.get("continue_heard_ms", 0) if window else 0,
    )


def choose(
    results: dict[str, dict[str, Any]], recordings: Sequence[str]
) -> tuple[str, dict[str, Any], bool] | None:
    """The rule (module doc) on `recordings`: (name, pooled figures, True);
    when nothing meets it, how close the family gets: the fewest fragments
    among the policies under GOAL_LATENCY_MS (then the rule's order), False.
    The barge-in variants are not candidates."""
    scored = [
        (name, r, pooled(r, recordings)) for name, r in results.items() if "barge-in" not in name
    ]
    ok = [x for x in scored if x[2]["fragment_rate_cut"] <= GOAL_FRAGMENTS]
    if ok:
        name, _, s = min(ok, key=lambda x: _order(x[1], x[2]))
        return name, s, True
    fast = [x for x in scored if (x[2]["latency_mean_ms"] or 1e9) < GOAL_LATENCY_MS]
    if not fast:
        return None
    name, _, s = min(fast, key=lambda x: (x[2]["fragment_rate_cut"], *_order(x[1], x[2])))
    return name, s, False


def analyze(results: dict[str, dict[str, Any]], recordings: Sequence[str]) -> dict[str, Any]:
    """picked (the rule on every recording), closest (when it picks
    nothing) and held_out: chosen on the other recordings, scored on each."""
    got = choose(results, recordings)
    out: dict[str, Any] = {"picked": None, "closest_under_goal_latency": None}
    if got is not None:
        key = "picked" if got[2] else "closest_under_goal_latency"
        out[key] = {"name": got[0], **_short(results[got[0]])}
    folds: dict[str, Any] = {}
    frags = cut = 0
    lat_sum, cases = 0.0, 0
    for rec in recordings if len(recordings) > 1 else ():
        fold = choose(results, [r for r in recordings if r != rec])
        if fold is None:
            folds[rec] = {"chosen": None}
            continue
        test = pooled(results[fold[0]], [rec])
        rb = results[fold[0]]["by_recording"][rec]
        folds[rec] = {
            "chosen": fold[0],
            "by_the_rule": fold[2],
            "held_out": {**test, "talk_over_stop_p95_ms": rb["talk_over_stop_p95_ms"]},
        }
        frags += round(test["fragment_rate_cut"] * (test["cases"] - 1))
        cut += test["cases"] - 1
        lat_sum += (test["latency_mean_ms"] or 0.0) * test["cases"]
        cases += test["cases"]
    pooled_out = None
    if cases:
        pooled_out = {
            "fragment_rate_cut": round(frags / max(1, cut), 4),
            "latency_mean_ms": round(lat_sum / cases, 1),
            "cases": cases,
        }
    out["held_out"] = {"folds": folds, "pooled": pooled_out}
    return out


def _short(s: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "fragment_rate_cut",
        "latency_mean_ms",
        "latency_p90_ms",
        "talk_over_stop_p95_ms",
        "cases",
    )
    return {k: s[k] for k in keep}


def meets_goal(s: dict[str, Any]) -> bool:
    lat, talk = s["latency_mean_ms"], s["talk_over_stop_p95_ms"]
    return (
        s["fragment_rate_cut"] <= GOAL_FRAGMENTS
        and lat is not None
        and lat < GOAL_LATENCY_MS
        and (talk is None or talk <= GOAL_TALK_OVER_MS)
    )


def result(policy: Policy, felt: list[Felt]) -> dict[str, Any]:
    return {**summarize(felt), "by_recording": by_recording(felt), "policy": policy.describe()}


def table_policies(chosen: Policy | None, model: bool) -> list[Policy]:
    """The issue's rows: silence 300/600/1000/1300 ms and the model (the
    default threshold, and the picked one), each without continuation and
    with the continue window and heard limit picked."""
    bases = [Policy(hangover_ms=h) for h in NAMED_HANGOVERS_MS]
    if model:
        bases += [Policy(threshold=D.TURN_THRESHOLD)]
        if chosen is not None and chosen.threshold not in (None, D.TURN_THRESHOLD):
            bases += [Policy(threshold=chosen.threshold)]
    out = []
    for b in bases:
        out.append(b)
        if chosen is not None and chosen.window_ms:
            out.append(dataclasses.replace(b, window_ms=chosen.window_ms, heard_ms=chosen.heard_ms))
    return out


# ------------------------------------------------------------ main


def load_model(cache: Path, meter: Meter) -> CachedDetector:
    from voice_agent.turn import load_detector

    detector = load_detector("model")
    clip = np.random.default_rng(1).normal(0, 0.05, RATE * 8).astype(np.float32)
    detector.predict([clip])
    times = []
    for _ in range(20):
        t = time.process_time()  # CPU time: one idle core's, however loaded the machine
        detector.predict([clip])
        times.append(time.process_time() - t)
    cached = CachedDetector(detector, meter, statistics.median(times))
    if cache.is_file():
        cached.cache = {bytes.fromhex(k): v for k, v in json.loads(cache.read_text()).items()}
    return cached


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--png", default="docs/benchmarks/turns.png", help="chart file")
    ap.add_argument("--no-model", action="store_true", help="silence policies only")
    ap.add_argument("--quick", action="store_true", help="one recording, a few policies")
    ap.add_argument("--model-cache", default="/tmp/voice-agent-turns-model-cache.json")
    ap.add_argument(
        "--partial",
        default="/tmp/voice-agent-turns-partial.jsonl",
        help="each policy's result is appended here as it is done; a rerun with --resume "
        "takes those from it instead of running them again",
    )
    ap.add_argument("--resume", action="store_true")
    args = ap.parse_args()
    t0 = time.perf_counter()
    from voice_agent.tts.piper import PiperTTS

    meter = Meter()
    speech = CachedSpeech(PiperTTS(threads=1), meter)
    detector = None if args.no_model else load_model(Path(args.model_cache), meter)
    recordings = RECORDINGS[3:4] if args.quick else RECORDINGS
    cases: list[Case] = build_cases(recordings)
    partial = Path(args.partial)
    done: dict[str, dict[str, Any]] = {}
    if args.resume and partial.is_file():
        for line in partial.read_text().splitlines():
            done.update(json.loads(line))
    elif partial.exists():
        partial.unlink()

    def run(policy: Policy) -> dict[str, Any]:
        if policy.name in done:
            return done[policy.name]
        felt = [score(c, simulate(c, policy.config(detector), speech, meter)) for c in cases]
        r = result(policy, felt)
        with partial.open("a") as f:
            f.write(json.dumps({policy.name: r}) + "\n")
        log(
            f"{policy.name}: fragments {r['fragment_rate_cut']:.3f}, "
            f"latency {r['latency_mean_ms']} ms, talk-over p95 {r['talk_over_stop_p95_ms']} ms"
        )
        return r

    runs = {p: run(p) for p in family(detector is not None, args.quick)}
    got = choose({p.name: r for p, r in runs.items()}, recordings)
    extra: dict[Policy, dict[str, Any]] = {}  # rows outside the family the rule picks from
    varied = None if got is None else next(p for p in runs if p.name == got[0])
    for policy in table_policies(varied, detector is not None):
        if policy not in runs:
            extra[policy] = run(policy)
    if varied is not None:  # what shorter barge-in lengths would do (not picked by)
        for b, bs in BARGE_INS_MS:
            policy = dataclasses.replace(varied, barge_in_ms=b, barge_in_speaking_ms=bs)
            extra[policy] = run(policy)
    if detector is not None:
        cache = {k.hex(): v for k, v in detector.cache.items()}
        Path(args.model_cache).write_text(json.dumps(cache))
    every = runs | extra
    results = {p.name: r for p, r in every.items()}
    rows = {
        p.name: {**_short(every[p]), "policy": p.describe()}
        for p in table_policies(varied, detector is not None)
        if p in every
    }
    barge_ins = {
        p.name: {**_short(r), "policy": p.describe()}
        for p, r in extra.items()
        if p.barge_in_speaking_ms != D.BARGE_IN_SPEAKING_MS
    }
    out = {
        "recordings": recordings,
        "cases": {
            "whole": sum(c.kind == "whole" for c in cases),
            "cut": sum(c.kind == "cut" for c in cases),
        },
        "pauses_ms": PAUSES_MS,
        "continuation": continuation_available(),
        "simulated": "virtual clock; Piper and the model charged at their measured CPU time",
        "engine": f"scripted, {TOKEN_S * 1000:g} ms a word: {REPLY!r}",
        "tts_ms_by_piece": speech.costs_ms(),  # empty when every result was resumed
        "model": None if detector is None else detector.name,
        "model_call_ms": None if detector is None else round(detector.call_s * 1000, 1),
        "model_calls": None if detector is None else detector.calls,
        "rule": (
            f"fragment_rate_cut <= {GOAL_FRAGMENTS}, then the lowest latency_mean_ms, "
            "then the smallest continue window and heard limit"
        ),
        "goal": (
            f"fragment_rate_cut <= {GOAL_FRAGMENTS}, latency_mean_ms < {GOAL_LATENCY_MS:g}, "
            f"talk_over_stop_p95_ms <= {GOAL_TALK_OVER_MS:g}"
        ),
        **analyze({p.name: r for p, r in runs.items()}, recordings),
        "table": rows,
        "barge_in_variants": barge_ins,
        "goal_met_by": [k for k, r in results.items() if meets_goal(r)],
        "results": results,
        "wall_s": round(time.perf_counter() - t0),
    }
    print(json.dumps(out, indent=2))
    from benchmarks.plot import felt_chart

    felt_chart(out, Path(args.png))


if __name__ == "__main__":
    main()
