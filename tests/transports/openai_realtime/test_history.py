"""The model's history in item ids (history.py) and, event by event, what
the translator edits in it: conversation.item.truncate of a finished reply
(TruncateReply of the tokens heard), out-of-band responses (conversation
"none": DropTurns(1) once they end), continuation (no network)."""

from __future__ import annotations

from typing import Any

from tests.transports.openai_realtime.support import events, send, translator, types
from voice_agent.engine.types import AppendMessage, DropTurns, TruncateReply
from voice_agent.protocol import (
    ErrorEvent,
    ReplyAudioDone,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)
from voice_agent.transports.openai_realtime.calls import Edit, Failed, Respond
from voice_agent.transports.openai_realtime.history import ModelHistory, heard_tokens
from voice_agent.transports.openai_realtime.translator import Translator

USAGE = {"prompt_tokens": 30, "cached_tokens": 12, "completion_tokens": 4}
TIMING = {"queue_ms": 1.0, "ttft_ms": 2.0, "total_ms": 3.0}
WORDS = ("one", " two", " three", " four")
USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}


def edits(outs: list[Any]) -> list[Edit]:
    return [o for o in outs if isinstance(o, Edit)]


def spoken_reply(t: Translator, n: int = 1, *, seconds: float = 1.0) -> str:
    """An utterance, its reply (WORDS, one token each) and `seconds` of its
    audio sent, text done (audio still going out); the reply's item id."""
    t.server(SpeechStartedEvent(f"u{n}", 0))
    t.server(SpeechStoppedEvent(f"u{n}", 0, 800))
    item_id: str = t.server(ReplyStarted(f"r{n}", f"u{n}"))[1]["item"]["id"]
    for w in WORDS:
        t.server(ReplyDelta(f"r{n}", w))
    t.audio(bytes(2 * round(24000 * seconds)), f"r{n}")
    t.server(ReplyDone(f"r{n}", "".join(WORDS), USAGE, TIMING))
    return item_id


def truncate(t: Translator, item_id: str, ms: int) -> list[Any]:
    return send(t, "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=ms)


def test_heard_tokens_counts_whole_deltas() -> None:
    marks = [3, 7, 13, 18]  # "one", " two", " three", " four"
    assert [heard_tokens(marks, c) for c in (0, 2, 3, 7, 12, 18, 99)] == [0, 0, 1, 2, 2, 4, 4]


def test_model_history_follows_turns_replies_and_appended_messages() -> None:
    h = ModelHistory()
    h.sent(("u1",), "n1")
    h.sent(("u2",), "n2")  # held by the Session while n1's reply runs
    h.replied("a1", "n1")
    assert h.last is not None and h.last.user == ("u2",) and not h.last.reply_started
    h.replied("a2", None)  # the oldest turn not answered
    assert h.last_reply("a2") and h.last_user("u2") and not h.last_reply("a1")
    h.appended("s1", "system")
    assert not h.last_reply("a2") and h.last.items() == ["u2", "a2", "s1"]
    assert h.drop_last().user == ("u2",)
    assert h.last_reply("a1")
    assert h.forget("a1") is not None and h.last is None


def test_truncating_a_finished_reply_cuts_the_history_to_the_tokens_heard() -> None:
    t = translator()
    item_id = spoken_reply(t)
    outs = truncate(t, item_id, 500)  # half of its audio: "one two" of "one two three four"
    assert edits(outs) == [Edit(TruncateReply(2))]
    assert outs.index(edits(outs)[0]) < types(outs).index("conversation.item.truncated")
    done = next(e for e in events(outs) if e["type"] == "response.done")["response"]
    assert done["status"] == "cancelled"  # its audio was still going out
    item = send(t, "conversation.item.retrieve", item_id=item_id)[0]["item"]
    assert item["content"][0]["transcript"] == "one two"
    assert edits(truncate(t, item_id, 1000)) == []  # nothing more to cut
    assert edits(truncate(t, item_id, 200)) == [Edit(TruncateReply(1))]


def test_a_reply_heard_whole_is_not_cut() -> None:
    t = translator()
    item_id = spoken_reply(t)
    t.server(ReplyAudioDone("r1", 1000, False))
    assert edits(truncate(t, item_id, 1000)) == []
    assert types(truncate(t, item_id, 0)) == ["Edit", "conversation.item.truncated"]


def test_a_reply_that_is_no_longer_the_last_keeps_its_history() -> None:
    t = translator()
    item_id = spoken_reply(t)
    t.server(SpeechStartedEvent("u2", 2000))
    t.server(SpeechStoppedEvent("u2", 2000, 2600))  # a newer user turn went to the model
    outs = truncate(t, item_id, 500)
    assert edits(outs) == []
    item = send(t, "conversation.item.retrieve", item_id=item_id)[0]["item"]
    assert item["content"][0]["transcript"] == "one two"  # the client's view is cut all the same
    other = translator()
    item_id = spoken_reply(other)
    send(other, "conversation.item.create", item={**USER, "role": "system"})
    assert edits(truncate(other, item_id, 500)) == []  # a system message follows it


def test_truncating_a_reply_still_generating_cuts_it_after_its_cancel() -> None:
    t = translator()
    item_id = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    for w in WORDS[:2]:
        t.server(ReplyDelta("r1", w))
    t.audio(bytes(2 * 24000), "r1")
    outs = truncate(t, item_id, 900)  # "one" of "one two": one token heard
    # queued now: the engine applies it once the cancelled turn has settled
    assert types(outs) == ["StopAudio", "Cancel", "Edit", "conversation.item.truncated"]
    assert edits(outs) == [Edit(TruncateReply(1))]
    t.server(ReplyDelta("r1", " three"))  # (sent before the cancel reached the Session)
    assert edits(t.server(ReplyCancelled("r1", "client", "one two three"))) == []
    # a reply with no delta seen is empty in the history, or not in it: no cut
    t2 = translator()
    item_id = t2.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    assert edits(truncate(t2, item_id, 0)) == []


def test_an_out_of_band_response_leaves_the_history_and_the_pending_items() -> None:
    t = translator()
    user = events(send(t, "conversation.item.create", item=USER))[0]["item"]["id"]
    meta = {"topic": "weather"}
    outs = send(
        t,
        "response.create",
        response={"conversation": "none", "metadata": meta, "output_modalities": ["text"]},
    )
    respond = outs[-1]
    assert isinstance(respond, Respond) and respond.turn.text == "hi" and not respond.audio
    assert user in t.items.pending  # still waiting for an in-band response
    opened = t.server(ReplyStarted("r1", None))
    assert types(opened) == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
    ]
    created = opened[0]["response"]
    assert created["conversation_id"] is None and created["metadata"] == meta
    oob_item = opened[1]["item"]["id"]
    t.server(ReplyDelta("r1", "sunny"))
    end = t.server(ReplyDone("r1", "sunny", USAGE, TIMING))
    assert end[0] == Edit(DropTurns(1, submitted=True))
    assert "conversation.item.done" not in types(end)
    done = next(e for e in events(end) if e["type"] == "response.done")["response"]
    assert done["conversation_id"] is None and done["metadata"] == meta
    assert done["output"][0]["content"] == [{"type": "output_text", "text": "sunny"}]
    assert isinstance(send(t, "conversation.item.retrieve", item_id=oob_item)[0], Failed)
    assert isinstance(truncate(t, oob_item, 0)[0], Failed)
    # an in-band response now answers the pending item, into the conversation
    again = send(t, "response.create")[-1]
    assert isinstance(again, Respond) and again.turn.text == "hi"
    assert "conversation.item.added" in types(t.server(ReplyStarted("r2", None)))
    assert t.items.pending == set()


def test_an_out_of_band_turn_is_dropped_as_the_last_submitted_one() -> None:
    """Cancelled, maybe before its first token: DropTurns(submitted=True) drops
    it if it entered the history and nothing older if not; a failed one left
    nothing to drop."""
    t = translator()
    send(t, "response.create", response={"conversation": "none"})
    t.server(ReplyStarted("r1", None))
    assert edits(t.server(ReplyCancelled("r1", "client", ""))) == [
        Edit(DropTurns(1, submitted=True))
    ]
    send(t, "response.create", response={"conversation": "none"})
    t.server(ReplyStarted("r2", None))
    assert edits(t.server(ErrorEvent("internal", "internal server error", "r2"))) == []


def test_an_out_of_band_response_does_not_change_what_can_be_edited() -> None:
    t = translator()
    item_id = spoken_reply(t)
    t.server(ReplyAudioDone("r1", 1000, False))
    send(t, "response.create", response={"conversation": "none", "output_modalities": ["text"]})
    t.server(ReplyStarted("r2", None))
    t.server(ReplyDone("r2", "", USAGE, TIMING))
    assert edits(truncate(t, item_id, 500)) == [Edit(TruncateReply(2))]


def test_pending_user_text_before_a_message_drops_as_one_turn() -> None:
    t = translator()
    a = events(send(t, "conversation.item.create", item=USER))[0]["item"]["id"]
    b = events(send(t, "conversation.item.create", item=USER))[0]["item"]["id"]
    note = {**USER, "role": "system", "content": [{"type": "input_text", "text": "note"}]}
    outs = send(t, "conversation.item.create", item=note)
    assert edits(outs)[0] == Edit(AppendMessage("user", "hi\nhi"))
    system = events(outs)[0]["item"]["id"]
    outs = send(t, "conversation.item.delete", item_id=b)
    assert edits(outs) == [Edit(DropTurns(1))]
    assert [e["item_id"] for e in events(outs)] == [a, b, system]


def test_a_continued_reply_and_its_user_item_are_deleted() -> None:
    t = translator()
    t.server(SpeechStartedEvent("u1", 0))
    user = t.server(SpeechStoppedEvent("u1", 0, 800))[2]["item"]["id"]
    reply = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    t.server(ReplyDelta("r1", "Sure"))
    outs = t.server(ReplyCancelled("r1", "continued", "Sure"))
    done = next(e for e in outs if e["type"] == "response.done")["response"]
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    deleted = [e["item_id"] for e in events(outs) if e["type"] == "conversation.item.deleted"]
    assert deleted == [user, reply] and not edits(outs)  # (the Session drops the turn itself)
    # a client that truncates it a moment later (its interruption) is told why it is gone
    [late] = truncate(t, reply, 0)
    assert isinstance(late, Failed) and "continuation" in str(late.exc)
    # withdrawn after its text was done (its audio not heard): only the deletions
    t.server(SpeechStartedEvent("u2", 0))
    user2 = t.server(SpeechStoppedEvent("u2", 0, 800))[2]["item"]["id"]
    reply2 = t.server(ReplyStarted("r2", "u2"))[1]["item"]["id"]
    t.server(ReplyDone("r2", "ok", USAGE, TIMING))
    t.settled("r2")
    outs = t.server(ReplyCancelled("r2", "continued", "ok"))
    assert types(outs) == ["conversation.item.deleted", "conversation.item.deleted"]
    assert [e["item_id"] for e in outs] == [user2, reply2]


def test_a_continued_reply_is_cut_before_it_is_taken_back() -> None:
    t = translator()
    t.server(SpeechStartedEvent("u1", 0))
    t.server(SpeechStoppedEvent("u1", 0, 800))
    item_id = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    for w in WORDS:
        t.server(ReplyDelta("r1", w))
    t.audio(bytes(2 * 24000), "r1")
    # the cut is queued before the Session takes the reply back (and drops its turn)
    assert edits(truncate(t, item_id, 500)) == [Edit(TruncateReply(2))]
    outs = t.server(ReplyCancelled("r1", "continued", "one two three four"))
    assert edits(outs) == []
