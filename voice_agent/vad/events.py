"""The Segmenter's settings (VadConfig) and the events it emits (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from voice_agent import session_defaults as D
from voice_agent.engine.types import AudioArray

VAD_KINDS = ("webrtc", "silero")


@dataclass(frozen=True)
class VadConfig:
    """Defaults: session_defaults (Config's, defined once)."""

    aggressiveness: int = D.VAD_AGGRESSIVENESS  # webrtcvad 0..3
    preroll_ms: int = D.PREROLL_MS  # audio before the onset included in the utterance
    hangover_ms: int = D.HANGOVER_MS  # this much silence ends the utterance
    min_speech_ms: int = D.MIN_SPEECH_MS  # shorter bursts are dropped as noise (counted)
    max_utterance_ms: int = D.MAX_UTTERANCE_MS  # longer speech is closed ("max_length"), continues
    vad: str = D.VAD  # frame scorer: "webrtc" or "silero"
    turn_check: bool = False  # TurnCheck at min_silence_ms, close at max_silence_ms
    min_silence_ms: int = D.MIN_SILENCE_MS  # with turn_check: silence before the detector is asked
    max_silence_ms: int = (
        D.MAX_SILENCE_MS
    )  # with turn_check: silence that closes an unfinished turn
    # with turn_check: later silence points (ms, each above min_silence_ms and
    # below max_silence_ms) where the detector is asked again
    recheck_ms: tuple[int, ...] = ()


@dataclass(frozen=True)
class SpeechStarted:
    utterance_id: int
    start_ms: int
    audio_start_ms: int | None = None  # where its audio (pre-roll included) begins


@dataclass(frozen=True)
class SpeechPaused:
    """Speech paused long enough that the hangover is running (emitted only
    with `pause_events`): `audio` is exactly what SpeechStopped("silence") will
    carry if no more speech comes, so a speculative prefill of it can be used
    as is when the utterance closes."""

    utterance_id: int
    audio: AudioArray


@dataclass(frozen=True)
class TurnCheck:
    """min_silence_ms (then each recheck_ms) of silence, emitted only with
    `turn_check`: is the turn over? Answer with Segmenter.turn_decision(
    utterance_id, check, ...); `check` (the last speech frame) makes an answer
    stale once speech resumes. Checks of one pause share `check` and differ in
    `silence_ms`."""

    utterance_id: int
    check: int
    audio: AudioArray  # the utterance so far, silence included, at most the last 8 s
    silence_ms: int = 0  # silence after the last speech frame, included at the end of `audio`


@dataclass(frozen=True)
class SpeechStopped:
    utterance_id: int
    start_ms: int
    end_ms: int  # end of the last speech frame, not where the hangover ended
    reason: str  # "end_of_turn" | "silence" | "max_length" | "commit" | "end_of_stream"
    audio: AudioArray  # 16 kHz mono float32: pre-roll + speech (+ up to 100 ms tail)
    eot_probability: float | None = None  # the detector's answer for the current pause
    voiced_ms: int = 0  # frames scored as speech, in ms
    audio_start_ms: int | None = None  # where `audio` begins (pre-roll included)
    closed_ms: int | None = None  # the input position (ms) at which it closed


SegmenterEvent = SpeechStarted | SpeechPaused | TurnCheck | SpeechStopped
