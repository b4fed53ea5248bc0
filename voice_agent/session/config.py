"""SessionConfig: a Session's settings (pure). Defaults: session_defaults,
where Config takes them from too (defined once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voice_agent import session_defaults as D
from voice_agent.commands import DeviceList
from voice_agent.vad import SileroModel, VadConfig


@dataclass(frozen=True)
class SessionConfig:
    vad: VadConfig = field(default_factory=VadConfig)
    barge_in_ms: int = D.BARGE_IN_MS  # speech this long cancels the running reply; <= 0: never
    # ... while the reply's audio plays: speech this long (at least barge_in_ms)
    barge_in_speaking_ms: int = D.BARGE_IN_SPEAKING_MS
    # continuation: speech resumed within this long after an utterance closed
    # (barge_in_ms of it scored as speech) withdraws that utterance's reply,
    # unless heard for more than continue_heard_ms, and joins the two as one
    # turn; <= 0: off
    continue_window_ms: int = D.CONTINUE_WINDOW_MS
    continue_heard_ms: int = D.CONTINUE_HEARD_MS
    # Silero VAD to confirm resumed speech with when vad is "webrtc" (which
    # scores music and clatter as speech): only frames Silero is sure of count
    # towards barge_in_ms for a continuation. None: the VAD's voiced frames.
    speech_check: SileroModel | None = None
    # waiting turns; beyond it the oldest is dropped
    max_queued_utterances: int = D.MAX_QUEUED_UTTERANCES
    max_text_chars: int = D.MAX_TEXT_CHARS  # longer `text` -> BadMessage
    system_prompt: str | None = None  # for the driver, when it opens the engine Conversation
    devices: DeviceList | None = None  # command allowlist; None: replies carry no commands
    speculative_prefill: bool = True  # Speculate actions while the hangover runs
    turn_threshold: float = D.TURN_THRESHOLD  # end-of-turn probability that closes the utterance
    # thresholds of the later checks: (silence_ms, threshold) at vad.recheck_ms
    turn_rechecks: tuple[tuple[int, float], ...] = ()
    # The end-of-turn detector (turn.TurnDetector) the driver runs for DetectTurn;
    # the Session never calls it. vad.turn_check says whether checks are made.
    turn_detector: Any = None
