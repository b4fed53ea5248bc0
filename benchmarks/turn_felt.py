"""What the user felt in one case of benchmarks/turns.py, and the totals.

Per case (from a turn_sim.Run; times in ms of the case's audio):

  fragment answered  the model never got the whole sentence as one turn: the
                     Session's history at the end is not exactly one user
                     turn whose audio runs from the first word (<= 100 ms
                     after its start) to the last word's start. A reply to a
                     fragment that stays there, even cancelled or empty,
                     counts; a reply taken back by continuation does not
  split              a speech.stopped came before the last word started (the
                     segmentation benchmark's false cut-off)
  latency            the end of the last word (forced alignment) to the
                     first audio frame of the reply that answers the final
                     turn, sent to the client (which plays it on arrival)
  talked over        a reply's audio was playing (first frame sent to the
                     moment it stopped: its end, or reply.cancelled /
                     reply.audio.done cancelled, when the client drops what
                     it holds) while the user said a word; `talk_over_ms`
                     runs from the first such word's start (or the audio's
                     start, if the user was already speaking) to that stop
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.turn_cases import RATE, Case
from benchmarks.turn_sim import Run
from voice_agent.protocol import ReplyAudioDone, ReplyCancelled, SpeechStoppedEvent

COVER_SLACK_MS = 100  # a turn may start this much after the first word starts


@dataclass
class Felt:
    recording: str
    kind: str
    split: bool
    fragment: bool
    latency_ms: float | None
    talk_over_ms: list[float] = field(default_factory=list)
    continued: int = 0  # replies cancelled with reason "continued"
    heard_taken_back_ms: float = 0.0  # audio of replies taken back that the user heard


def playback(run: Run) -> dict[str, tuple[float, float]]:
    """Each reply's audio as heard: (first frame sent, when it stopped)."""
    start: dict[str, float] = {}
    head: dict[str, float] = {}
    for t, reply_id, n in run.frames:
        start.setdefault(reply_id, t)
        head[reply_id] = max(t, head.get(reply_id, t)) + n * 1000 / RATE
    stop: dict[str, float] = {}
    for t, ev in run.events:
        rid = getattr(ev, "reply_id", None)
        dropped = isinstance(ev, ReplyCancelled) or (
            isinstance(ev, ReplyAudioDone) and ev.cancelled
        )
        if dropped and rid is not None and rid not in stop:
            stop[rid] = t
    return {r: (a, min(head[r], stop.get(r, head[r]))) for r, a in start.items()}


def score(case: Case, run: Run) -> Felt:
    stops = {
        ev.utterance_id: ev for _, ev in run.events if isinstance(ev, SpeechStoppedEvent)
    }  # the last speech.stopped of each utterance
    first_word, last_word = case.words[0][0], case.last_word_start_ms
    users = [h for h in run.history if h.role == "user"]

    def covers(uid: str | None, audio_ms: int | None) -> bool:
        ev = stops.get(uid or "")
        if ev is None or audio_ms is None:
            return False
        return ev.end_ms - audio_ms <= first_word + COVER_SLACK_MS and ev.end_ms >= last_word

    whole = len(users) == 1 and covers(users[0].utterance_id, users[0].audio_ms)
    split = any(
        isinstance(ev, SpeechStoppedEvent) and ev.end_ms < last_word for _, ev in run.events
    )
    heard = playback(run)
    final = next((h.reply_id for h in reversed(run.history) if h.role == "assistant"), None)
    latency = None
    if final is not None and final in heard:
        latency = heard[final][0] - case.last_word_end_ms
    talk = []
    for a, b in heard.values():
        onsets = [max(a, s) for s, e in case.words if s < b and e > a]
        if onsets:
            talk.append(b - min(onsets))
    taken = [
        ev.reply_id
        for _, ev in run.events
        if isinstance(ev, ReplyCancelled) and ev.reason == "continued"
    ]
    heard_back = sum(heard[r][1] - heard[r][0] for r in taken if r in heard)
    return Felt(case.recording, case.kind, split, not whole, latency, talk, len(taken), heard_back)


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return round(statistics.fmean(values), 1) if values else None


def summarize(felt: Sequence[Felt]) -> dict[str, Any]:
    cut = [f for f in felt if f.kind == "cut"]
    whole = [f for f in felt if f.kind == "whole"]
    lat = [f.latency_ms for f in felt if f.latency_ms is not None]
    lat_whole = [f.latency_ms for f in whole if f.latency_ms is not None]
    talk = [ms for f in felt for ms in f.talk_over_ms]
    talked = [f for f in felt if f.talk_over_ms]
    return {
        "cases": len(felt),
        "fragment_rate_cut": round(sum(f.fragment for f in cut) / max(1, len(cut)), 4),
        "fragments_cut": sum(f.fragment for f in cut),
        "fragments_whole": sum(f.fragment for f in whole),
        "split_rate": round(sum(f.split for f in felt) / max(1, len(felt)), 3),
        "latency_mean_ms": _mean(lat),
        "latency_p90_ms": _pct(lat, 90),
        "latency_whole_only_mean_ms": _mean(lat_whole),
        "latency_whole_only_p90_ms": _pct(lat_whole, 90),
        "no_reply_audio": sum(f.latency_ms is None for f in felt),
        "talked_over_rate": round(len(talked) / max(1, len(felt)), 3),
        "talk_over_stop_mean_ms": _mean(talk),
        "talk_over_stop_p95_ms": _pct(talk, 95),
        "talk_over_stop_max_ms": round(max(talk), 1) if talk else None,
        "continued": sum(f.continued for f in felt),
        "taken_back_heard_mean_ms": _mean([f.heard_taken_back_ms for f in felt if f.continued]),
    }


def by_recording(felt: Sequence[Felt]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rec in dict.fromkeys(f.recording for f in felt):
        s = summarize([f for f in felt if f.recording == rec])
        keep = ("fragment_rate_cut", "latency_mean_ms", "talk_over_stop_p95_ms", "cases")
        out[rec] = {k: s[k] for k in keep}
    return out
