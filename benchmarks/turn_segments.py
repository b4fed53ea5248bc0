"""End of turn: silence hangover vs the Smart Turn model, on real recordings,
as segmentation (where speech.stopped falls); what the user feels, with
replies, talk-over and continuation, is benchmarks/turns.py.

Cases, from the five single-sentence English recordings in ../shared/audio
(their transcripts: ../shared/audio/README.md, the Qwen-Audio README for
libritts-1089, DeepSpeech's test for new-home-in-the-stars; each is ONE
sentence, its commas are pauses inside it). WORDS holds each word's start and
end, from a forced alignment of the transcript (pocketsphinx 5 `en-us`,
10 ms frames; it matches the word times Qwen-Audio's README gives). Each
recording is trimmed to its words (200 ms before the first, 150 ms after the
last: this drops the applause at the end of jfk.wav), and every silence the
benchmark adds is the recording's own room tone (its quietest 20 ms frames,
shuffled) rather than digital zeros, as a live microphone would send:

  whole  0.5 s of room tone, the sentence, 2.5 s of room tone: the turn is
         over after the last word (the speaker's own pauses stay in it)
  cut    the same, cut at a boundary between two words inside the sentence
         (every boundary, once), with a pause of PAUSES_MS of room tone there
         in place of whatever pause the speaker made, then the rest: the turn
         is not over at the cut. Boundaries with under 300 ms of speech
         before them are skipped: the VAD drops such a burst as noise, so no
         turn exists yet and nothing about ending turns is tested

Scoring, per case (both kinds):

  false cut-off   the sentence was split: a speech.stopped came before its
                  last word (anywhere: at the cut or at one of the speaker's
                  own pauses; `at_cut`/`elsewhere` split the count, and
                  `per_pause` counts a cut case only at its cut and a whole
                  case at its own pauses, so no pause counts twice)
  delay           from the end of the last speech frame (speech.stopped's
                  end_ms) to the moment speech.stopped is emitted, in audio
                  time, plus for a model decision the measured time of one
                  model call (one CPU thread, this machine, median);
                  `from_word_end` measures from the aligned end of the last
                  word instead (the VAD loses a word's fade-out: it ends
                  speech up to ~300 ms before the word does)

Methods. Silence: the Session with `hangover_ms` H, replayed exactly.
Model: one pass per case through a Segmenter that asks the model at every
silence point of GRID_MS and never closes on it (the trace); a decision
policy (a first check at min_silence_ms with turn_threshold, then the
turn_rechecks schedule, closing at max_silence_ms regardless) is scored from
the trace: exact up to a case's first close, which is all a false cut-off
needs; the delay of a case already cut off comes from the held-open run.
The named model rows (NAMED) are replayed exactly through the Session, the
way the server runs them. Defaults are picked by a stated rule (the lowest
mean delay with at most 5 % false cut-offs) on four recordings and scored on
the fifth (leave one recording out), and on all five (in-sample).

Prints JSON; writes the chart (benchmarks/plot.py turns_chart). Takes about
10 minutes on one CPU core (the model call dominates). Run:
python benchmarks/turn_segments.py > docs/benchmarks/turn-segments.json
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.plot import turns_chart
from benchmarks.turn_cases import PAUSES_MS, RATE, RECORDINGS, Case, build_cases
from voice_agent import session_defaults as D
from voice_agent.audio import float_to_pcm16
from voice_agent.protocol import SpeechStoppedEvent
from voice_agent.session import DetectTurn, Send, Session, SessionConfig
from voice_agent.turn import Rechecks, SmartTurn, load_detector, threshold_at
from voice_agent.vad import Segmenter, SpeechStopped, TurnCheck, VadConfig

CHUNK = 640  # 20 ms
HANGOVERS_MS = (300, 600, 1000)  # the silence rows
SILENCE_CURVE_MS = (200, 300, 400, 500, 600, 800, 1000, 1200, 1300, 1500)
MIN_SILENCE_MS, MAX_SILENCE_MS = D.MIN_SILENCE_MS, D.MAX_SILENCE_MS  # the server's defaults
GRID_MS = (200, 300, 400, 600, 800, 1000, 1200, 1400)  # where the trace asks the model
GOAL_CUTOFFS, GOAL_DELAY_MS = 0.05, 400.0


class Model:
    """The detector, with a cache (the same audio gets the same answer) and a
    count of the calls made."""

    def __init__(self, detector: SmartTurn) -> None:
        self.detector = detector
        self.cache: dict[bytes, float] = {}
        self.calls = 0

    def __call__(self, audio: np.ndarray) -> float:
        key = hashlib.sha1(np.ascontiguousarray(audio).tobytes()).digest()
        if key not in self.cache:
            self.cache[key] = self.detector.predict([audio])[0]
            self.calls += 1
        return self.cache[key]

    def call_ms(self, n: int = 30) -> float:
        """Median time of one uncached call on an 8 s clip (features + model)."""
        clip = np.random.default_rng(1).normal(0, 0.05, RATE * 8).astype(np.float32)
        self.detector.predict([clip])
        times = []
        for _ in range(n):
            t = time.perf_counter()
            self.detector.predict([clip])
            times.append((time.perf_counter() - t) * 1000)
        return statistics.median(times)


# ------------------------------------------------------------ the trace


@dataclass
class Pause:
    end_ms: int  # end of the last speech frame before it
    probs: dict[int, float] = field(default_factory=dict)  # silence_ms -> p, where reached
    closed: bool = False  # max_silence_ms reached (the Segmenter closed the utterance)


def trace(case: Case, model: Model) -> list[Pause]:
    """Every pause of the case, with the model's answer at each GRID_MS point
    the pause reached; the model never closes anything here."""
    seg = Segmenter(
        VadConfig(
            turn_check=True,
            min_silence_ms=GRID_MS[0],
            recheck_ms=GRID_MS[1:],
            max_silence_ms=MAX_SILENCE_MS,
        )
    )
    pauses: dict[int, Pause] = {}  # by check (last speech frame)
    last: Pause | None = None
    pcm = float_to_pcm16(case.audio)
    events = []
    for i in range(0, len(pcm), CHUNK):
        events += seg.feed(pcm[i : i + CHUNK])
    events += seg.flush()
    for ev in events:
        if isinstance(ev, TurnCheck):
            key = (ev.utterance_id << 32) + ev.check
            last = pauses.setdefault(key, Pause((ev.check + 1) * 20))
            last.probs[ev.silence_ms] = model(ev.audio)
        elif isinstance(ev, SpeechStopped) and ev.reason == "silence" and last is not None:
            last.closed = True
    return list(pauses.values())


@dataclass(frozen=True)
class Policy:
    name: str
    threshold: float
    min_silence_ms: int = MIN_SILENCE_MS
    rechecks: Rechecks = ()
    max_silence_ms: int = MAX_SILENCE_MS

    def close(self, pause: Pause) -> int | None:
        """Silence at which this pause closes (model or max_silence), or None."""
        for s in (self.min_silence_ms, *(ms for ms, _ in self.rechecks)):
            p = pause.probs.get(s)
            if p is not None and p >= threshold_at(s, self.threshold, self.rechecks):
                return s
        return self.max_silence_ms if pause.closed else None

    def describe(self) -> dict[str, object]:
        return {
            "min_silence_ms": self.min_silence_ms,
            "turn_threshold": self.threshold,
            "turn_rechecks": ",".join(f"{ms}:{t:g}" for ms, t in self.rechecks),
            "max_silence_ms": self.max_silence_ms,
        }


def policies() -> list[Policy]:
    """The family swept: one check at 200/300/400/600 ms; checks every 200 ms
    at one threshold; a falling schedule (strict at first, laxer later)."""
    out = []
    thresholds = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99)
    for s0 in (200, 300, 400, 600):
        for t in thresholds:
            out.append(Policy(f"one check {s0} ms p>={t}", t, s0))
    later = (400, 600, 800, 1000, 1200, 1400)
    for t in thresholds:
        out.append(Policy(f"every 200 ms p>={t}", t, 200, tuple((s, t) for s in later)))
    for hi in (0.9, 0.95, 0.99):
        for lo in (0.5, 0.7, 0.8, 0.9):
            if lo < hi:
                mid = round((hi + lo) / 2, 3)
                sched = ((400, mid), (600, lo), (800, lo), (1000, lo), (1200, lo), (1400, lo))
                out.append(Policy(f"falling {hi}->{lo}", hi, 200, sched))
    return out


def score_trace(
    cases: Sequence[Case], traces: Sequence[list[Pause]], policy: Policy, call_ms: float
) -> dict[str, Any]:
    stats = _Stats()
    for case, pauses in zip(cases, traces, strict=True):
        *inner, final = pauses
        closes = [(p, policy.close(p)) for p in inner]
        first = next((p for p, s in closes if s is not None), None)
        at_cut = first is not None and _at_cut(case, first)
        s = policy.close(final)
        if s is None:  # cannot happen: the tail is longer than max_silence
            raise AssertionError(f"{case.recording}: the last pause never closed")
        model = s < policy.max_silence_ms
        per_pause = (
            any(s is not None for _, s in closes)
            if case.kind == "whole"
            else any(s is not None and _at_cut(case, p) for p, s in closes)
        )
        stats.add(case, first is not None, at_cut, per_pause, final.end_ms, s, model, call_ms)
    return stats.result()


def _at_cut(case: Case, pause: Pause) -> bool:
    """The pause is the one inserted at the cut (the VAD may end the word
    before the cut, by up to a word's fade-out)."""
    return case.cut_ms is not None and case.cut_ms - 400 <= pause.end_ms <= case.cut_ms + 100


class _Stats:
    def __init__(self) -> None:
        self.n = self.cut = self.at_cut = self.per_pause = 0
        self.delays: list[float] = []
        self.from_word: list[float] = []
        self.by_rec: dict[str, list[float]] = {}

    def add(
        self,
        case: Case,
        cut: bool,
        at_cut: bool,
        per_pause: bool,
        end_ms: int,
        silence_ms: int,
        model: bool,
        call_ms: float,
    ) -> None:
        self.n += 1
        self.cut += cut
        self.at_cut += at_cut
        self.per_pause += per_pause
        delay = silence_ms + (call_ms if model else 0.0)
        self.delays.append(delay)
        self.from_word.append(end_ms + delay - case.last_word_end_ms)
        rec = self.by_rec.setdefault(case.recording, [0, 0, 0.0])
        rec[0] += 1
        rec[1] += cut
        rec[2] += delay

    def result(self) -> dict[str, Any]:
        return {
            "false_cutoff_rate": round(self.cut / self.n, 3),
            "false_cutoffs": self.cut,
            "at_cut": self.at_cut,
            "elsewhere": self.cut - self.at_cut,
            "per_pause_rate": round(self.per_pause / self.n, 3),
            "cases": self.n,
            "mean_delay_ms": round(statistics.fmean(self.delays), 1),
            "p90_delay_ms": round(float(np.percentile(self.delays, 90)), 1),
            "mean_delay_from_word_end_ms": round(statistics.fmean(self.from_word), 1),
            "by_recording": {
                k: {"false_cutoff_rate": round(v[1] / v[0], 3), "mean_delay_ms": round(v[2] / v[0])}
                for k, v in self.by_rec.items()
            },
        }


# ------------------------------------------------------------ exact replays


def replay(
    cases: Sequence[Case], config: SessionConfig, model: Model | None, call_ms: float
) -> dict[str, Any]:
    """Each case through the Session as the server runs it (DetectTurn answered
    at once; the model's call time is added to its decisions' delay)."""
    stats = _Stats()
    for case in cases:
        s = Session("bench", config)
        pcm = float_to_pcm16(case.audio)
        stops: list[tuple[SpeechStoppedEvent, int]] = []
        for i in range(0, len(pcm) + CHUNK, CHUNK):
            actions = s.feed_audio(pcm[i : i + CHUNK]) if i < len(pcm) else s.end_of_stream()
            for act in list(actions):
                if isinstance(act, DetectTurn) and model is not None:
                    p = model(act.audio)
                    actions += s.on_turn_decision(act.utterance_id, act.check, p, act.silence_ms)
            for act in actions:
                if isinstance(act, Send) and isinstance(act.event, SpeechStoppedEvent):
                    stops.append((act.event, s.position_ms))
        if any(ev.start_ms > case.last_word_end_ms for ev, _ in stops):
            raise AssertionError(f"{case.recording}: the room tone was heard as speech")
        *early, (final, at) = stops
        cut = bool(early)
        at_cut = cut and case.cut_ms is not None and _stop_at_cut(case, early[0][0], early[0][1])
        if case.kind == "whole":
            per_pause = cut
        else:
            per_pause = any(_stop_at_cut(case, ev, t) for ev, t in early)
        model_closed = final.reason == "end_of_turn"
        stats.add(
            case, cut, at_cut, per_pause, final.end_ms, at - final.end_ms, model_closed, call_ms
        )
    return stats.result()


def _stop_at_cut(case: Case, ev: SpeechStoppedEvent, at: int) -> bool:
    assert case.cut_ms is not None and case.resume_ms is not None
    return case.cut_ms - 400 <= ev.end_ms <= case.cut_ms + 100 and at <= case.resume_ms + 20


def session_config(policy: Policy | None, hangover_ms: int = D.HANGOVER_MS) -> SessionConfig:
    if policy is None:
        return SessionConfig(vad=VadConfig(hangover_ms=hangover_ms))
    vad = VadConfig(
        turn_check=True,
        min_silence_ms=policy.min_silence_ms,
        recheck_ms=tuple(ms for ms, _ in policy.rechecks),
        max_silence_ms=policy.max_silence_ms,
    )
    return SessionConfig(vad=vad, turn_threshold=policy.threshold, turn_rechecks=policy.rechecks)


# ------------------------------------------------------------ picking defaults


def pick(
    cases: Sequence[Case], traces: Sequence[list[Pause]], family: Sequence[Policy], call_ms: float
) -> tuple[Policy, dict[str, Any]] | None:
    """The rule: the lowest mean delay with at most GOAL_CUTOFFS false cut-offs."""
    best: tuple[Policy, dict[str, Any]] | None = None
    for policy in family:
        r = score_trace(cases, traces, policy, call_ms)
        if r["false_cutoff_rate"] <= GOAL_CUTOFFS and (
            best is None or r["mean_delay_ms"] < best[1]["mean_delay_ms"]
        ):
            best = (policy, r)
    return best


def leave_one_out(
    cases: Sequence[Case], traces: Sequence[list[Pause]], family: Sequence[Policy], call_ms: float
) -> dict[str, Any]:
    """Pick on four recordings, score on the fifth; pooled: every case scored
    with the policy picked without its recording."""
    folds: dict[str, Any] = {}
    n = cut = per_pause = 0
    delay_sum = 0.0
    for rec in RECORDINGS:
        train = [(c, t) for c, t in zip(cases, traces, strict=True) if c.recording != rec]
        test = [(c, t) for c, t in zip(cases, traces, strict=True) if c.recording == rec]
        got = pick([c for c, _ in train], [t for _, t in train], family, call_ms)
        if got is None:
            folds[rec] = {"picked": None}
            continue
        policy = got[0]
        r = score_trace([c for c, _ in test], [t for _, t in test], policy, call_ms)
        folds[rec] = {"picked": policy.name, "held_out": _short(r)}
        n += r["cases"]
        cut += r["false_cutoffs"]
        per_pause += round(r["per_pause_rate"] * r["cases"])
        delay_sum += r["mean_delay_ms"] * r["cases"]
    pooled = {
        "false_cutoff_rate": round(cut / max(1, n), 3),
        "per_pause_rate": round(per_pause / max(1, n), 3),
        "mean_delay_ms": round(delay_sum / max(1, n), 1),
        "cases": n,
    }
    return {
        "rule": f"lowest mean delay with false_cutoff_rate <= {GOAL_CUTOFFS}",
        "folds": folds,
        "pooled": pooled,
    }


def _short(r: dict[str, Any]) -> dict[str, Any]:
    keep = ("false_cutoff_rate", "per_pause_rate", "mean_delay_ms", "cases")
    return {k: r[k] for k in keep}


# ------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--png", default="docs/benchmarks/turn-segments.png", help="chart file")
    args = parser.parse_args()
    t0 = time.perf_counter()
    detector = load_detector("model")
    assert isinstance(detector, SmartTurn)
    model = Model(detector)
    call_ms = model.call_ms()
    cases = build_cases()
    traces = [trace(c, model) for c in cases]
    for c, t in zip(cases, traces, strict=True):  # the last pause is the sentence end
        heard = t[-1].end_ms if t else -1  # (nothing in the room tone is heard as speech)
        assert c.last_word_start_ms <= heard <= c.last_word_end_ms + 200, (c.recording, c.boundary)
    family = policies()
    sweep = {p.name: _short(score_trace(cases, traces, p, call_ms)) for p in family}
    chosen = pick(cases, traces, family, call_ms)
    loo = leave_one_out(cases, traces, family, call_ms)

    results: dict[str, dict[str, Any]] = {}
    for h in sorted(set(HANGOVERS_MS) | set(SILENCE_CURVE_MS)):
        results[f"silence {h} ms"] = replay(cases, session_config(None, h), None, call_ms)
    named = [Policy(f"model p>={t} at 200 ms", t) for t in (0.5, 0.7, 0.9)]
    if chosen is not None:
        named.append(dataclasses.replace(chosen[0], name=f"model picked: {chosen[0].name}"))
    for policy in named:
        results[policy.name] = replay(cases, session_config(policy), model, call_ms)
        results[policy.name]["policy"] = policy.describe()
    out = {
        "recordings": RECORDINGS,
        "cases": {
            "whole": sum(c.kind == "whole" for c in cases),
            "cut": sum(c.kind == "cut" for c in cases),
            "boundaries": len({(c.recording, c.cut_ms) for c in cases if c.kind == "cut"}),
        },
        "pauses_ms": PAUSES_MS,
        "silence": "room tone of each recording",
        "model": detector.name,
        "model_call_ms": round(call_ms, 1),
        "model_calls": model.calls,
        "grid_ms": GRID_MS,
        "results": results,
        "sweep": sweep,
        "picked_in_sample": None if chosen is None else {"name": chosen[0].name, **chosen[1]},
        "leave_one_recording_out": loo,
        "goal": f"false_cutoff_rate <= {GOAL_CUTOFFS} and mean_delay_ms < {GOAL_DELAY_MS:g}",
        "goal_met_by": [
            k
            for k, r in results.items()
            if r["false_cutoff_rate"] <= GOAL_CUTOFFS and r["mean_delay_ms"] < GOAL_DELAY_MS
        ],
        "wall_s": round(time.perf_counter() - t0),
    }
    print(json.dumps(out, indent=2))
    turns_chart(out, Path(args.png))


if __name__ == "__main__":
    main()
