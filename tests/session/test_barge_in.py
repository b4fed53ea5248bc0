"""Session: barge-in, while the reply runs and while its audio is heard."""

from __future__ import annotations

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
from voice_agent.engine.types import Delta, Timing, TurnResult, Usage
from voice_agent.protocol import (
    ReplyCancelled,
    ReplyStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)
from voice_agent.session import (
    Action,
    CancelTurn,
    HistoryEntry,
    Session,
    SessionConfig,
    StopAudio,
)
from voice_agent.vad import VadConfig

# barge-in alone: speech this soon after the turn closed would otherwise be a
# continuation under the default window (tests/session/test_continuation.py)
NO_CONTINUE = SessionConfig(continue_window_ms=0)

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
    s = Session("s1", NO_CONTINUE)  # barge_in_ms = 300
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
    s = Session("s1", NO_CONTINUE)
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
    s = Session("s1", NO_CONTINUE)
    start_reply(s)
    s.on_delta("r1", Delta("Sure,", 2))
    assert s.playing is None  # reply.audio.started not sent yet
    assert cancels(feed(s, clip(350))) == [CancelTurn("r1", 2, "barge_in")]
    # after the playback ended, the normal rule is back
    s = Session("s1", NO_CONTINUE)
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
    s = Session("s1", NO_CONTINUE)
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
