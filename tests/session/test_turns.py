"""Session: one turn, the queue of waiting turns, client actions (cancel,
text, commit, end of stream) and engine failures."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.session.support import (
    CHUNK,
    NO_BARGE,
    PAD_S,
    RATE,
    events,
    feed,
    kinds,
    result,
    silence,
    speech,
    start_reply,
    state,
    submits,
    utterance,
)
from voice_agent.engine.types import Delta, TurnInput
from voice_agent.errors import BadAudio, BadMessage, EngineError
from voice_agent.protocol import (
    ErrorEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    encode,
)
from voice_agent.session import (
    Action,
    CancelTurn,
    HistoryEntry,
    Send,
    Session,
    SessionConfig,
)

# ---------------------------------------------------------------- one turn


def test_utterance_becomes_a_turn() -> None:
    s = Session("s1")
    assert state(s) == "idle"
    pcm = utterance()
    actions: list[Action] = []
    states = []
    for i in range(0, len(pcm), CHUNK):
        actions += s.feed_audio(pcm[i : i + CHUNK])
        states.append(state(s))
    assert kinds(actions, speculate=False) == [
        "speech.started",
        "speech.stopped",
        "reply.started",
        "SubmitTurn",
    ]
    started, stopped, reply = events(actions)
    assert isinstance(started, SpeechStartedEvent) and isinstance(stopped, SpeechStoppedEvent)
    assert started.utterance_id == stopped.utterance_id == "u1"
    assert started.start_ms == stopped.start_ms
    assert 1100 <= started.start_ms <= 1300  # speech begins at ~1.2 s of the stream
    assert 3600 <= stopped.end_ms <= 3900
    assert stopped.reason == "silence"
    assert reply == ReplyStarted("r1", "u1")
    sub = submits(actions)[0]
    assert (sub.reply_id, sub.utterance_id) == ("r1", "u1")
    assert sub.turn.text is None and sub.turn.audio is not None
    assert sub.turn.audio.dtype == np.float32
    speech_s = (stopped.end_ms - stopped.start_ms) / 1000
    assert speech_s <= len(sub.turn.audio) / RATE <= speech_s + 0.5  # + pre-roll and tail
    # idle -> listening while the utterance is open -> thinking once submitted
    assert states[0] == "idle"
    assert "listening" in states
    assert states[-1] == "thinking"
    first_listen = states.index("listening")
    assert set(states[first_listen : states.index("thinking")]) == {"listening"}
    assert s.position_ms == len(pcm) // 2 * 1000 // RATE


def test_deltas_then_done() -> None:
    s = Session("s1")
    sub = start_reply(s)
    assert s.reply_id == "r1"
    assert s.on_delta("r1", Delta("Hello", 1)) == [Send(ReplyDelta("r1", "Hello"))]
    assert state(s) == "replying"
    assert s.on_delta("r1", Delta(" there.", 3)) == [Send(ReplyDelta("r1", " there."))]
    actions = s.on_done("r1", result("Hello there."))
    assert actions == [
        Send(
            ReplyDone(
                "r1",
                "Hello there.",
                {"prompt_tokens": 50, "cached_tokens": 10, "completion_tokens": 3},
                {"queue_ms": 1.2, "ttft_ms": 80.0, "total_ms": 200.0},
            )
        )
    ]
    assert state(s) == "idle" and s.reply_id is None
    assert sub.turn.audio is not None
    audio_ms = len(sub.turn.audio) * 1000 // RATE
    assert s.history == [
        HistoryEntry("user", None, audio_ms, "u1", "r1", False),
        HistoryEntry("assistant", "Hello there.", None, "u1", "r1", False),
    ]
    # the encoded reply.done carries the usage and timing objects
    assert '"usage":{"prompt_tokens":50' in encode(events(actions)[0])


def test_empty_delta_is_not_sent() -> None:
    s = Session("s1")
    start_reply(s)
    assert s.on_delta("r1", Delta("", 1)) == []
    assert state(s) == "thinking"


def test_espeak_speech_at_22050_hz(tmp_path: Path) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng not installed (apt-get install espeak-ng)")
    wav = tmp_path / "kitchen.wav"
    subprocess.run(
        ["espeak-ng", "-v", "en-us", "-s", "160", "-w", str(wav), "turn on the kitchen light"],
        check=True,
        capture_output=True,
    )
    data, rate = sf.read(str(wav), dtype="int16")
    assert rate == 22050
    pad = np.zeros(rate, dtype=np.int16)
    pcm = np.concatenate([pad, data, pad]).astype("<i2").tobytes()
    s = Session("s1", sample_rate=rate)
    actions = feed(s, pcm, chunk=rate * 2 // 50)
    assert kinds(actions, speculate=False) == [
        "speech.started",
        "speech.stopped",
        "reply.started",
        "SubmitTurn",
    ]
    stopped = events(actions)[1]
    assert isinstance(stopped, SpeechStoppedEvent)
    assert 900 <= stopped.start_ms <= 1100  # the speech starts after 1 s of silence
    assert stopped.end_ms - stopped.start_ms >= 1000


# ---------------------------------------------------------------- queueing


def test_utterances_during_a_reply_are_answered_in_order() -> None:
    s = Session("s1", NO_BARGE)
    start_reply(s)
    a2 = feed(s, utterance("new-home-in-the-stars-16k.wav"))
    a3 = feed(s, utterance())
    # speech events still go out, but nothing is submitted while r1 runs
    assert kinds(a2) == ["speech.started", "speech.stopped"]
    assert kinds(a3) == ["speech.started", "speech.stopped"]
    assert s.queued == 2 and state(s) == "thinking"
    s.on_delta("r1", Delta("One", 1))
    done1 = s.on_done("r1", result("One"))
    assert kinds(done1) == ["reply.done", "reply.started", "SubmitTurn"]
    assert events(done1)[1] == ReplyStarted("r2", "u2")
    assert submits(done1)[0].utterance_id == "u2"
    assert state(s) == "thinking"
    done2 = s.on_done("r2", result("Two"))
    assert events(done2)[1] == ReplyStarted("r3", "u3")
    assert kinds(s.on_done("r3", result("Three"))) == ["reply.done"]
    assert state(s) == "idle" and s.queued == 0
    assert [(h.role, h.utterance_id, h.reply_id) for h in s.history] == [
        ("user", "u1", "r1"),
        ("assistant", "u1", "r1"),
        ("user", "u2", "r2"),
        ("assistant", "u2", "r2"),
        ("user", "u3", "r3"),
        ("assistant", "u3", "r3"),
    ]


def test_speech_shorter_than_barge_in_ms_does_not_cancel() -> None:
    # ldc93s1 has ~2.6 s of speech: under a 5 s barge-in threshold
    s = Session("s1", SessionConfig(barge_in_ms=5000))
    start_reply(s)
    s.on_delta("r1", Delta("Hi", 1))
    actions = feed(s, utterance())
    assert kinds(actions) == ["speech.started", "speech.stopped"]
    assert s.barge_ins == 0 and s.reply_id == "r1" and state(s) == "replying"
    assert events(s.on_done("r1", result("Hi")))[1] == ReplyStarted("r2", "u2")


def test_queue_bound_drops_the_oldest_waiting_turn() -> None:
    s = Session("s1", SessionConfig(barge_in_ms=0, max_queued_utterances=2))
    start_reply(s)
    assert s.text("one") == [] and s.text("two") == []
    actions = s.text("three")
    assert len(actions) == 1
    err = events(actions)[0]
    assert isinstance(err, ErrorEvent) and err.code == "busy"
    assert "dropped" in err.message and err.reply_id is None
    assert s.dropped_utterances == 1 and s.queued == 2
    # a spoken utterance counts too, and pushes out the oldest ("two")
    spoken = feed(s, utterance())
    assert kinds(spoken) == ["speech.started", "speech.stopped", "error"]
    assert s.dropped_utterances == 2
    subs = submits(s.on_done("r1", result("x")))
    assert subs[0].turn.text == "three"
    subs = submits(s.on_done("r2", result("x")))
    assert subs[0].utterance_id == "u2" and subs[0].turn.audio is not None
    assert s.on_done("r3", result("x"))[1:] == []


def test_queue_bound_zero_answers_only_when_idle() -> None:
    s = Session("s1", SessionConfig(max_queued_utterances=0))
    assert kinds(s.text("first")) == ["reply.started", "SubmitTurn"]
    assert kinds(s.text("second")) == ["error"]
    assert s.dropped_utterances == 1
    assert kinds(s.on_done("r1", result("ok"))) == ["reply.done"]


# ---------------------------------------------------------------- client actions


def test_client_cancel_submits_the_next_waiting_turn() -> None:
    s = Session("s1", NO_BARGE)
    assert s.cancel() == []
    start_reply(s)
    feed(s, utterance("new-home-in-the-stars-16k.wav"))  # u2 waits
    s.on_delta("r1", Delta("It is", 2))
    actions = s.cancel()
    assert actions[0] == CancelTurn("r1", 2, "client")
    assert kinds(actions) == ["CancelTurn", "reply.cancelled", "reply.started", "SubmitTurn"]
    assert events(actions)[0] == ReplyCancelled("r1", "client", "It is")
    assert events(actions)[1] == ReplyStarted("r2", "u2")
    assert s.barge_ins == 0
    assert s.history[-1] == HistoryEntry("assistant", "It is", None, "u1", "r1", True)
    assert s.on_delta("r1", Delta(" late", 3)) == []
    assert s.on_delta("r2", Delta("Yes", 1)) == [Send(ReplyDelta("r2", "Yes"))]


def test_text_turn() -> None:
    s = Session("s1")
    actions = s.text("turn on the kitchen light")
    assert kinds(actions) == ["reply.started", "SubmitTurn"]
    assert events(actions)[0] == ReplyStarted("r1", None)
    assert '"utterance_id":null' in encode(events(actions)[0])
    sub = submits(actions)[0]
    assert sub.utterance_id is None
    assert sub.turn.text == "turn on the kitchen light" and sub.turn.audio is None
    s.on_done("r1", result("Done."))
    assert s.history[0] == HistoryEntry("user", "turn on the kitchen light", None, None, "r1")


def test_text_limits() -> None:
    s = Session("s1", SessionConfig(max_text_chars=10))
    assert kinds(s.text("x" * 10)) == ["reply.started", "SubmitTurn"]
    with pytest.raises(BadMessage, match="10 characters"):
        s.text("x" * 11)
    with pytest.raises(BadMessage, match="empty"):
        s.text("  \n")
    assert s.queued == 0 and s.reply_id == "r1"


def test_whole_turn_at_once_is_queued_like_text() -> None:
    """Session.turn (request/reply transports: an MQTT clip with or without an
    instruction): no VAD, submitted as given, queued behind a running reply."""
    s = Session("s1", NO_BARGE)
    clip = np.zeros(RATE // 2, np.float32)  # 500 ms, silence: the VAD never sees it
    first = TurnInput(audio=clip, text="what is this sound?")
    actions = s.turn(first)
    assert kinds(actions) == ["reply.started", "SubmitTurn"]
    assert submits(actions)[0].turn is first and submits(actions)[0].utterance_id is None
    assert s.turn(TurnInput(audio=clip)) == []  # waits behind r1
    assert s.queued == 1
    following = s.on_done("r1", result("A quiet room."))
    assert kinds(following) == ["reply.done", "reply.started", "SubmitTurn"]
    assert s.history[0] == HistoryEntry("user", "what is this sound?", 500, None, "r1")


def test_whole_turn_limits() -> None:
    s = Session("s1", SessionConfig(max_text_chars=10))
    with pytest.raises(BadMessage, match="10 characters"):
        s.turn(TurnInput(text="x" * 11))
    with pytest.raises(BadMessage, match="audio or text"):
        s.turn(TurnInput(text="  \n"))
    assert s.queued == 0 and s.reply_id is None
    assert kinds(s.turn(TurnInput(text="x" * 10))) == ["reply.started", "SubmitTurn"]


def test_commit_closes_the_utterance_now() -> None:
    s = Session("s1")
    assert s.commit() == []
    pcm = utterance()
    part = round((PAD_S + 1.5) * RATE) * 2  # 1.3 s into the speech
    opened = feed(s, pcm[:part])
    assert kinds(opened) == ["speech.started"]
    actions = s.commit()
    assert kinds(actions) == ["speech.stopped", "reply.started", "SubmitTurn"]
    stopped = events(actions)[0]
    assert isinstance(stopped, SpeechStoppedEvent) and stopped.reason == "commit"
    assert stopped.end_ms <= 1000 * (PAD_S + 1.5)
    assert state(s) == "thinking"


def test_end_of_stream_closes_the_utterance() -> None:
    s = Session("s1")
    pcm = silence(PAD_S) + speech("ldc93s1-16k-mono.wav")  # no trailing silence
    feed(s, pcm)
    actions = s.end_of_stream()
    assert kinds(actions)[:1] == ["speech.stopped"]
    assert kinds(actions)[-2:] == ["reply.started", "SubmitTurn"]
    stopped = events(actions)[0]
    assert isinstance(stopped, SpeechStoppedEvent)
    assert stopped.reason == "silence"  # "end_of_stream" is not a wire reason
    assert s.end_of_stream() == []
    assert s.commit() == []
    with pytest.raises(BadAudio):
        s.feed_audio(silence(0.02))
    assert kinds(s.text("still here")) == []  # queued behind r1: text works after audio ends


# ---------------------------------------------------------------- engine failures


def test_failed_turn_reports_error_and_the_next_turn_proceeds() -> None:
    s = Session("s1", NO_BARGE)
    start_reply(s)
    s.text("next")
    s.on_delta("r1", Delta("par", 1))
    actions = s.on_failed("r1", RuntimeError("CUDA out of memory at /secret/path"))
    assert kinds(actions) == ["error", "reply.started", "SubmitTurn"]
    err = events(actions)[0]
    assert err == ErrorEvent("internal", "internal server error", "r1")
    assert "secret" not in encode(err)
    assert events(actions)[1] == ReplyStarted("r2", None)
    assert s.history == []  # a failed turn is not in the history
    failed = s.on_failed("r2", EngineError("the model failed on this turn"))
    assert events(failed) == [ErrorEvent("internal", "the model failed on this turn", "r2")]
    assert state(s) == "idle"


def test_unknown_reply_ids_are_ignored() -> None:
    s = Session("s1")
    assert s.on_delta("r1", Delta("x", 1)) == []
    assert s.on_done("r1", result("x")) == []
    assert s.on_failed("r1", RuntimeError()) == []
    s.text("hi")
    assert s.on_delta("r7", Delta("x", 1)) == []
    assert s.on_done("r7", result("x")) == []
    assert s.reply_id == "r1" and state(s) == "thinking"
