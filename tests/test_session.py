"""session.py: the turn state machine driven with real speech in 20 ms chunks."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voice_agent.audio import decode, float_to_pcm16
from voice_agent.engine.base import Delta, Timing, TurnResult, Usage
from voice_agent.errors import BadAudio, BadMessage, EngineError
from voice_agent.protocol import (
    ErrorEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
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
    Speculate,
    StopAudio,
    SubmitTurn,
)
from voice_agent.vad import VadConfig

AUDIO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
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


# ---------------------------------------------------------------- barge-in


def barge(s: Session, pcm: bytes) -> tuple[list[Action], bytes, int]:
    """Feed until a CancelTurn appears; return (actions so far, PCM not fed yet, ms fed)."""
    before: list[Action] = []
    for i in range(0, len(pcm), CHUNK):
        got = s.feed_audio(pcm[i : i + CHUNK])
        before += got
        if any(isinstance(a, CancelTurn) for a in got):
            return before, pcm[i + CHUNK :], (i + CHUNK) * 1000 // (2 * RATE)
    raise AssertionError("no barge-in")


def test_barge_in_cancels_with_the_sent_text_and_tokens() -> None:
    s = Session("s1")  # barge_in_ms = 300
    start_reply(s)
    s.on_delta("r1", Delta("Sure,", 2))
    s.on_delta("r1", Delta(" the light", 5))
    s.on_delta("r1", Delta("", 6))  # not sent: does not move keep_tokens
    before, remaining, fed_ms = barge(s, utterance())
    assert kinds(before) == ["speech.started", "CancelTurn", "reply.cancelled"]
    started = events(before)[0]
    assert isinstance(started, SpeechStartedEvent) and started.utterance_id == "u2"
    # fired once the new speech lasted 300 ms (plus a frame or two of onset detection)
    onset_in_chunk_ms = 1000 * PAD_S + 200  # where ldc93s1's speech begins in `utterance()`
    assert onset_in_chunk_ms + 300 <= fed_ms <= onset_in_chunk_ms + 400
    assert before[1] == CancelTurn("r1", 5, "barge_in")
    assert events(before)[1] == ReplyCancelled("r1", "barge_in", "Sure, the light")
    assert s.barge_ins == 1
    assert state(s) == "listening" and s.reply_id is None
    assert [(h.role, h.text, h.cancelled) for h in s.history] == [
        ("user", None, False),
        ("assistant", "Sure, the light", True),
    ]
    # late pieces of the cancelled reply are ignored
    assert s.on_delta("r1", Delta(" is on", 7)) == []
    assert s.on_done("r1", TurnResult("Sure, the light", Usage(), Timing(), True)) == []
    assert s.on_failed("r1", RuntimeError("late")) == []
    # the interrupting utterance is answered when it closes
    rest = feed(s, remaining)
    assert kinds(rest) == ["speech.stopped", "reply.started", "SubmitTurn"]
    assert events(rest)[1] == ReplyStarted("r2", "u2")
    assert len(s.history) == 2


def test_barge_in_while_thinking_keeps_nothing() -> None:
    s = Session("s1")
    start_reply(s)
    assert state(s) == "thinking"
    before, _, _ = barge(s, utterance())
    assert before[1] == CancelTurn("r1", 0, "barge_in")
    assert events(before)[1] == ReplyCancelled("r1", "barge_in", "")
    assert s.history[-1] == HistoryEntry("assistant", "", None, "u1", "r1", True)


def test_barge_in_within_one_big_chunk() -> None:
    s = Session("s1")
    start_reply(s)
    actions = s.feed_audio(utterance())  # the whole utterance in one call
    assert kinds(actions) == [
        "speech.started",
        "speech.stopped",
        "CancelTurn",
        "reply.cancelled",
        "reply.started",
        "SubmitTurn",
    ]
    assert events(actions)[3] == ReplyStarted("r2", "u2")


def test_waiting_turns_stay_queued_behind_a_barge_in() -> None:
    s = Session("s1")
    start_reply(s)
    assert s.text("and the hallway?") == []  # waits behind r1
    before, remaining, _ = barge(s, utterance())
    # r1 is cancelled, but nothing starts while the user is still talking
    assert kinds(before) == ["speech.started", "CancelTurn", "reply.cancelled"]
    assert s.queued == 1 and state(s) == "listening"
    assert s.text("queued while talking") == []
    # the utterance closes: the waiting turns go first, in order, then u2
    rest = feed(s, remaining)
    assert kinds(rest) == ["speech.stopped", "reply.started", "SubmitTurn"]
    assert submits(rest)[0].turn.text == "and the hallway?"
    assert submits(s.on_done("r2", result("a")))[0].turn.text == "queued while talking"
    last = submits(s.on_done("r3", result("b")))[0]
    assert last.utterance_id == "u2" and last.turn.audio is not None


def test_speech_already_going_on_does_not_barge_in() -> None:
    s = Session("s1")
    pcm = utterance()
    half = len(pcm) // 2 // CHUNK * CHUNK  # mid-speech
    feed(s, pcm[:half])
    assert state(s) == "listening"
    typed = s.text("what time is it?")
    assert kinds(typed) == ["reply.started", "SubmitTurn"]
    rest = feed(s, pcm[half:])
    assert kinds(rest) == ["speech.stopped"]  # queued, no CancelTurn
    assert s.barge_ins == 0 and s.reply_id == "r1"


def test_max_length_continuation_does_not_barge_in() -> None:
    s = Session("s1", SessionConfig(vad=VadConfig(max_utterance_ms=1500)))
    actions = feed(s, utterance())
    stops = [e for e in events(actions) if isinstance(e, SpeechStoppedEvent)]
    assert [e.reason for e in stops][:1] == ["max_length"]
    assert len(stops) >= 2
    assert not any(isinstance(a, CancelTurn) for a in actions)
    assert s.barge_ins == 0
    assert stops[1].start_ms == stops[0].end_ms
    # the first part is answered; the continuation waits for it
    assert [a.utterance_id for a in submits(actions)] == ["u1"]
    assert s.queued == len(stops) - 1


def test_barge_in_disabled() -> None:
    s = Session("s1", NO_BARGE)
    start_reply(s)
    assert not any(isinstance(a, CancelTurn) for a in feed(s, utterance()))


# ------------------------------------------------- barge-in while speaking


def clip(speech_ms: int) -> bytes:
    """ldc93s1 cut `speech_ms` after its onset, with silence around. Its voiced
    frames (what barge-in counts): 350 ms of speech hold 340 ms, 700 ms 580 ms."""
    onset = int(0.2 * RATE)  # the speech starts 200 ms into the file
    pcm = speech("ldc93s1-16k-mono.wav")[: 2 * (onset + speech_ms * RATE // 1000)]
    return silence(PAD_S) + pcm + silence(1.0)


def cancels(actions: list[Action]) -> list[Action]:
    return [a for a in actions if isinstance(a, CancelTurn | StopAudio)]


def test_while_the_reply_is_heard_barge_in_needs_longer_speech() -> None:
    s = Session("s1")  # barge_in_ms 300, barge_in_speaking_ms 500
    start_reply(s)
    s.on_delta("r1", Delta("Sure,", 2))
    assert s.playback("r1", True) == []
    assert s.playing == "r1"
    short = feed(s, clip(350))  # 340 ms voiced: would barge in when not heard
    assert cancels(short) == []
    assert kinds(short) == ["speech.started", "speech.stopped"]  # u2 waits behind r1
    assert s.reply_id == "r1" and s.queued == 1 and s.barge_ins == 0
    long = feed(s, clip(700))  # 580 ms voiced
    assert cancels(long) == [CancelTurn("r1", 2, "barge_in")]
    assert ReplyCancelled("r1", "barge_in", "Sure,") in events(long)
    assert s.barge_ins == 1 and s.playing is None  # reply.cancelled stops the audio


def test_barge_in_fires_after_barge_in_speaking_ms_of_speech() -> None:
    s = Session("s1")
    start_reply(s)
    s.playback("r1", True)
    _, _, fed_ms = barge(s, utterance())
    onset_in_chunk_ms = 1000 * PAD_S + 200
    assert onset_in_chunk_ms + 500 <= fed_ms <= onset_in_chunk_ms + 700
    # the same speech barges in earlier when the reply is not heard (yet)
    s = Session("s1")
    start_reply(s)
    _, _, fed_ms = barge(s, utterance())
    assert fed_ms <= onset_in_chunk_ms + 400


def test_short_speech_barges_in_when_the_reply_is_not_heard() -> None:
    s = Session("s1")
    start_reply(s)
    s.on_delta("r1", Delta("Sure,", 2))
    assert s.playing is None  # reply.audio.started not sent yet
    assert cancels(feed(s, clip(350))) == [CancelTurn("r1", 2, "barge_in")]
    # after the playback ended, the normal rule is back
    s = Session("s1")
    start_reply(s)
    s.playback("r1", True)
    s.playback("r1", False)
    assert s.playing is None
    assert cancels(feed(s, clip(350))) == [CancelTurn("r1", 0, "barge_in")]


def test_barge_in_speaking_ms_is_never_below_barge_in_ms() -> None:
    s = Session("s1", SessionConfig(barge_in_ms=300, barge_in_speaking_ms=100))
    start_reply(s)
    s.playback("r1", True)
    assert cancels(feed(s, clip(250))) == []  # 240 ms voiced: under barge_in_ms
    off = Session("s1", SessionConfig(barge_in_ms=0))
    start_reply(off)
    off.playback("r1", True)
    assert cancels(feed(off, clip(700))) == []  # barge-in off stays off


def test_speech_while_a_finished_reply_is_still_heard_stops_its_audio() -> None:
    s = Session("s1")
    start_reply(s)
    s.on_delta("r1", Delta("Sure, the light is on.", 6))
    s.playback("r1", True)
    s.on_done("r1", result("Sure, the light is on."))
    assert s.reply_id is None and s.playing == "r1"  # text done, audio still playing
    rest = feed(s, clip(700))
    assert cancels(rest) == [StopAudio("r1", "barge_in")]
    assert "reply.cancelled" not in kinds(rest)  # the text reply had finished
    assert s.barge_ins == 1 and s.playing is None
    # the interrupting utterance is answered when it closes
    assert events(rest)[-1] == ReplyStarted("r2", "u2")
    assert s.history[1] == HistoryEntry("assistant", "Sure, the light is on.", None, "u1", "r1")


def test_short_speech_after_the_text_does_not_stop_the_audio() -> None:
    s = Session("s1")
    start_reply(s)
    s.playback("r1", True)
    s.on_done("r1", result("Sure."))
    actions = feed(s, clip(350))
    assert cancels(actions) == [] and s.barge_ins == 0
    # it is answered, and the new reply ends the old one's playback
    assert events(actions)[-1] == ReplyStarted("r2", "u2")
    assert s.playing is None


def test_stale_playback_reports_are_ignored() -> None:
    s = Session("s1")
    assert s.playback("r1", True) == [] and s.playing is None  # no such reply
    start_reply(s)
    s.playback("r0", True)
    assert s.playing is None
    s.on_delta("r1", Delta("Sure,", 2))
    s.cancel()
    s.playback("r1", True)  # arrived after the cancel stopped it
    assert s.playing is None
    s.text("again")  # r2
    s.playback("r2", True)
    s.playback("r1", False)  # another reply's end
    assert s.playing == "r2"
    s.playback("r2", False)
    assert s.playing is None


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
    s = Session("s1")
    start_reply(s)
    assert not [a for a in feed(s, utterance()) if isinstance(a, Speculate)]
    off = Session("s2", SessionConfig(speculative_prefill=False))
    actions = feed(off, utterance())
    assert "Speculate" not in kinds(actions) and len(submits(actions)) == 1
