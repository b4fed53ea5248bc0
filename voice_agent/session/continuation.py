"""Continuation: what the Session remembers of the last closed utterance, so
speech that resumes soon after can take its reply back and be answered with
it as one turn (see the package doc; pure, no clocks: positions are the
microphone's sample count in ms).

    candidate   the last spoken turn that closed on a pause ("silence" or
                "end_of_turn"; not "commit", "max_length" or "end_of_stream"),
                while no typed turn came after it
    resumed     the next utterance started within `continue_window_ms` of the
                candidate's close and its reply had been heard for at most
                `continue_heard_ms` by then: `prefix` (the candidate's audio
                plus the pause, up to where the new utterance's audio begins)
                is kept for the join
    joining     the new utterance was scored as speech long enough: the reply
                was withdrawn, and the utterance is answered with `prefix`
                in front when it closes
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from voice_agent.audio import duration_ms
from voice_agent.engine.types import SAMPLE_RATE, AudioArray, TurnInput
from voice_agent.session.config import SessionConfig
from voice_agent.vad import SileroScorer, SpeechStarted, SpeechStopped
from voice_agent.vad.frames import to_pcm16
from voice_agent.vad.scoring import SILERO_SURE

_PER_MS = SAMPLE_RATE // 1000
# kept audio beyond window + hangover + pre-roll + min_speech (scorer lag, chunking)
KEEP_SLACK_MS = 1000
# A resumed utterance that closed before lasting barge_in_ms (a short last
# word) joins when Silero was sure of this much of it: a lone "year" after a
# pause scores 140 ms sure frames (benchmarks/turn_cases.py, ldc93s1), glass
# breaking and music 0 in every half second (../shared/audio).
SHORT_WORD_SURE_MS = 100
# the pause reasons after which speech may continue an utterance
PAUSE_REASONS = frozenset({"silence", "end_of_turn"})


@dataclass(frozen=True)
class Turn:
    """A user turn waiting or answered (the Session's)."""

    utterance_id: str | None
    turn: TurnInput
    audio_ms: int | None


@dataclass
class Candidate:
    turn: Turn  # the waiting or answered turn (its audio starts at audio_start_ms)
    audio_start_ms: int
    closed_ms: int
    reply_id: str | None = None  # once submitted
    play_from: int | None = None  # position when its reply's audio began playing
    play_until: int | None = None  # ... and when it stopped
    resumed_by: int | None = None  # segmenter id of the utterance that resumed
    prefix: AudioArray | None = None  # audio up to where that utterance's audio begins
    check: SileroScorer | None = None  # config.speech_check on that utterance's audio
    checked_ms: int = 0  # position up to which its audio was scored
    sure_ms: int = 0  # ... of which Silero was sure it is speech

    def confirmed_ms(self, audio_span: Callable[[int, int], AudioArray | None], now_ms: int) -> int:
        """Score the resuming utterance's audio up to `now_ms` with the speech
        check; how much of it is sure speech."""
        if self.check is None:
            return 0
        audio = audio_span(self.checked_ms, now_ms) if now_ms > self.checked_ms else None
        if audio is not None:
            self.checked_ms = now_ms
            scores = self.check.score(to_pcm16(audio))
            self.sure_ms += 20 * sum(1 for p in scores if p >= SILERO_SURE)
        return self.sure_ms

    @property
    def audio(self) -> AudioArray:
        audio = self.turn.turn.audio
        assert audio is not None
        return audio

    def heard_ms(self, at_ms: int) -> int:
        """How long its reply's audio had played at position `at_ms`."""
        if self.play_from is None:
            return 0
        end = at_ms if self.play_until is None else min(at_ms, self.play_until)
        return max(0, end - self.play_from)

    def join(self, audio: AudioArray) -> AudioArray:
        """`prefix` followed by the resuming utterance's `audio`."""
        assert self.prefix is not None
        return np.concatenate([self.prefix, audio]).astype(np.float32, copy=False)


def prefix_audio(
    c: Candidate, gap: AudioArray | None, resume_audio_start_ms: int
) -> AudioArray | None:
    """The joined turn's audio before `resume_audio_start_ms`: the candidate's
    audio and `gap` (the audio from its end to there), or the candidate's audio
    cut there when the two overlap (its tail and the new pre-roll). None when
    the gap is needed and was not kept."""
    first = c.audio
    end_ms = c.audio_start_ms + len(first) // _PER_MS
    if resume_audio_start_ms <= end_ms:
        keep = max(0, resume_audio_start_ms - c.audio_start_ms) * _PER_MS
        return first[:keep]
    if gap is None:
        return None
    return np.concatenate([first, gap]).astype(np.float32, copy=False)


def gap_span(c: Candidate, resume_audio_start_ms: int) -> tuple[int, int]:
    """The positions (ms) of the pause audio `prefix_audio` needs."""
    end_ms = c.audio_start_ms + len(c.audio) // _PER_MS
    return end_ms, max(end_ms, resume_audio_start_ms)


def enabled(config: SessionConfig) -> bool:
    """Continuation is on: a window, and barge-in on (it interrupts a reply too)."""
    return config.continue_window_ms > 0 and config.barge_in_ms > 0


def keep_ms(config: SessionConfig) -> int:
    """Audio the Segmenter keeps for the pause of a continuation (0: off)."""
    if not enabled(config):
        return 0
    v = config.vad
    close = v.max_silence_ms if v.turn_check else v.hangover_ms
    return config.continue_window_ms + close + v.preroll_ms + v.min_speech_ms + KEEP_SLACK_MS


def candidate(
    turn: Turn, ev: SpeechStopped, audio_start_ms: int | None, config: SessionConfig
) -> Candidate | None:
    """The candidate a closed utterance (as `turn`, its audio starting at
    audio_start_ms) leaves, if it closed on a pause and continuation is on."""
    if not enabled(config) or ev.reason not in PAUSE_REASONS:
        return None
    if audio_start_ms is None or ev.closed_ms is None:
        return None
    return Candidate(turn, audio_start_ms, ev.closed_ms)


def resumed(
    c: Candidate | None,
    ev: SpeechStarted,
    audio_span: Callable[[int, int], AudioArray | None],
    config: SessionConfig,
) -> Candidate | None:
    """Speech started (`ev`): the candidate, resumed by it, when it started
    within the window and the reply had been heard for at most
    continue_heard_ms; else None (no candidate any more). `audio_span`: the
    Segmenter's kept audio."""
    if c is None or ev.audio_start_ms is None:
        return None
    if ev.start_ms - c.closed_ms > config.continue_window_ms:
        return None
    if c.heard_ms(ev.start_ms) > config.continue_heard_ms:
        return None
    start, end = gap_span(c, ev.audio_start_ms)
    prefix = prefix_audio(c, audio_span(start, end), ev.audio_start_ms)
    if prefix is None:
        return None
    c.resumed_by = ev.utterance_id
    c.prefix = prefix
    if config.speech_check is not None and config.vad.vad == "webrtc":
        c.check = SileroScorer(config.speech_check)
        c.checked_ms = ev.audio_start_ms
    return c


def closed_turns(
    joining: Candidate | None, ev: SpeechStopped, uid: str, config: SessionConfig
) -> tuple[list[Turn], str | None, int | None]:
    """The turns a closed utterance (`uid`) makes, the utterance it continues
    and where the (last) turn's audio begins: itself, or, when `joining` was
    resumed by it, one turn with the joined audio (two turns again when that
    would exceed max_utterance_ms, the model's window)."""
    own = Turn(uid, TurnInput(audio=ev.audio), duration_ms(ev.audio))
    if joining is None or joining.resumed_by != ev.utterance_id:
        return [own], None, ev.audio_start_ms
    audio = joining.join(ev.audio)
    ms = duration_ms(audio)
    if ms > config.vad.max_utterance_ms:
        return [joining.turn, own], None, ev.audio_start_ms
    return (
        [Turn(uid, TurnInput(audio=audio), ms)],
        joining.turn.utterance_id,
        joining.audio_start_ms,
    )
