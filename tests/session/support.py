"""Shared by the Session tests: real recordings as PCM, feeding a Session in
20 ms chunks, and reading the actions it returns."""

from __future__ import annotations

import pytest
import soundfile as sf

from tests.helpers.paths import AUDIO_DIR
from voice_agent.engine.types import Timing, TurnResult, Usage
from voice_agent.protocol import ServerEvent
from voice_agent.session import Action, Send, Session, SessionConfig, Speculate, SubmitTurn

RATE = 16000
CHUNK = RATE * 2 // 50  # 20 ms of 16 kHz mono PCM16

# Speech edges the segmenter finds (default VadConfig) in these files, padded
# with PAD_S of silence before: ldc93s1 speaks 200..2780 ms of the file,
# new-home 700..3120 ms.
PAD_S = 1.0
NO_BARGE = SessionConfig(barge_in_ms=0)


def speech(name: str) -> bytes:
    """A real recording as 16 kHz mono PCM16."""
    path = AUDIO_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} not found: tests need ../shared/audio beside the project")
    data, rate = sf.read(str(path), dtype="int16")
    assert rate == RATE and data.ndim == 1
    return bytes(data.astype("<i2").tobytes())


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * RATE))


def utterance(name: str = "ldc93s1-16k-mono.wav") -> bytes:
    """Silence, speech, and enough silence after it for the hangover to close it."""
    return silence(PAD_S) + speech(name) + silence(1.0)


def feed(session: Session, pcm: bytes, chunk: int = CHUNK) -> list[Action]:
    actions: list[Action] = []
    for i in range(0, len(pcm), chunk):
        actions += session.feed_audio(pcm[i : i + chunk])
    return actions


def events(actions: list[Action]) -> list[ServerEvent]:
    return [a.event for a in actions if isinstance(a, Send)]


def kinds(actions: list[Action], speculate: bool = True) -> list[str]:
    """Event types and action names; `speculate=False` leaves Speculate out."""
    return [
        a.event.type if isinstance(a, Send) else type(a).__name__
        for a in actions
        if speculate or not isinstance(a, Speculate)
    ]


def submits(actions: list[Action]) -> list[SubmitTurn]:
    return [a for a in actions if isinstance(a, SubmitTurn)]


def state(s: Session) -> str:
    """The state as a plain str (mypy would narrow the Literal property across calls)."""
    return s.state


def result(text: str, tokens: int = 3) -> TurnResult:
    return TurnResult(text, Usage(50, 10, tokens), Timing(1.25, 80.04, 200.0))


def start_reply(session: Session, name: str = "ldc93s1-16k-mono.wav") -> SubmitTurn:
    """Speak one utterance while idle; return the turn it submitted."""
    subs = submits(feed(session, utterance(name)))
    assert len(subs) == 1
    return subs[0]
