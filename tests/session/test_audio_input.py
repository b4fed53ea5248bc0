"""Session: audio input (bad audio, formats, noise, several utterances) and
speculative prefill."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.paths import AUDIO_DIR
from tests.session.support import (
    CHUNK,
    NO_BARGE,
    RATE,
    events,
    feed,
    kinds,
    silence,
    speech,
    start_reply,
    state,
    submits,
    utterance,
)
from voice_agent.audio import decode, float_to_pcm16
from voice_agent.errors import BadAudio
from voice_agent.protocol import (
    SpeechStartedEvent,
)
from voice_agent.session import (
    Session,
    SessionConfig,
    Speculate,
)

# ---------------------------------------------------------------- audio input


def test_bad_audio_leaves_the_session_usable() -> None:
    s = Session("s1")
    pcm = utterance()
    actions = feed(s, pcm[: len(pcm) // 2 // CHUNK * CHUNK])
    before = (state(s), s.position_ms)
    with pytest.raises(BadAudio):
        s.feed_audio(b"\x00\x01\x02")
    assert (state(s), s.position_ms) == before
    actions += feed(s, pcm[len(pcm) // 2 // CHUNK * CHUNK :])
    assert kinds(actions, speculate=False) == [
        "speech.started",
        "speech.stopped",
        "reply.started",
        "SubmitTurn",
    ]


def test_unsupported_format_is_bad_audio() -> None:
    with pytest.raises(BadAudio):
        Session("s1", sample_rate=4000)
    with pytest.raises(BadAudio):
        Session("s1", channels=3)


def test_stereo_input() -> None:
    mono = np.frombuffer(utterance(), dtype="<i2")
    stereo = np.stack([mono, mono], axis=1).astype("<i2").tobytes()
    s = Session("s1", channels=2)
    actions = feed(s, stereo, chunk=2 * CHUNK)
    assert kinds(actions, speculate=False) == [
        "speech.started",
        "speech.stopped",
        "reply.started",
        "SubmitTurn",
    ]


def test_short_noise_is_counted_not_answered() -> None:
    s = Session("s1")
    burst = speech("ldc93s1-16k-mono.wav")[RATE : RATE + 2 * 140 * 16]  # 140 ms
    actions = feed(s, silence(1.0) + burst + silence(1.0))
    assert actions == []
    assert s.dropped_noise == 1 and state(s) == "idle"


def test_two_utterances_in_one_stream() -> None:
    s = Session("s1", NO_BARGE)
    a = np.frombuffer(utterance(), dtype="<i2")
    b = float_to_pcm16(decode(AUDIO_DIR / "new-home-in-the-stars-16k.wav"))
    actions = feed(s, a.tobytes() + b + silence(1.0))
    started = [e for e in events(actions) if isinstance(e, SpeechStartedEvent)]
    assert [e.utterance_id for e in started] == ["u1", "u2"]
    assert [a.utterance_id for a in submits(actions)] == ["u1"]
    assert s.queued == 1


# ------------------------------------------------------- speculative prefill


def test_speculate_carries_exactly_the_audio_of_the_turn() -> None:
    s = Session("s1")
    actions = feed(s, utterance())
    names = kinds(actions)
    assert names.index("Speculate") < names.index("speech.stopped")
    specs = [a for a in actions if isinstance(a, Speculate)]
    [turn] = submits(actions)
    assert turn.turn.audio is not None
    # the last pause before the close is the one the turn ends with
    assert np.array_equal(specs[-1].audio, turn.turn.audio)


def test_no_speculate_while_a_reply_is_in_flight_or_when_disabled() -> None:
    s = Session("s1", SessionConfig(continue_window_ms=0))  # speech into a reply, not a resumption
    start_reply(s)
    assert not [a for a in feed(s, utterance()) if isinstance(a, Speculate)]
    off = Session("s2", SessionConfig(speculative_prefill=False))
    actions = feed(off, utterance())
    assert "Speculate" not in kinds(actions) and len(submits(actions)) == 1
