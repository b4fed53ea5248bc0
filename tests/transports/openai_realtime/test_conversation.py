"""The translator, event by event: conversation.item.create of system and
assistant messages (AppendMessage) and conversation.item.delete (DropTurns,
TruncateReply(0), or refused by name) (no network)."""

from __future__ import annotations

from typing import Any

from tests.transports.openai_realtime.support import b64, events, send, translator, types
from voice_agent.engine.types import AppendMessage, DropTurns, TruncateReply
from voice_agent.protocol import (
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)
from voice_agent.transports.openai_realtime.calls import Edit, Failed, Respond
from voice_agent.transports.openai_realtime.translator import SPEAK_FIRST, Translator

USAGE = {"prompt_tokens": 30, "cached_tokens": 12, "completion_tokens": 2}
TIMING = {"queue_ms": 1.0, "ttft_ms": 2.0, "total_ms": 3.0}


def message(role: str, text: str, **fields: Any) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}], **fields}


def create(t: Translator, role: str, text: str, **fields: Any) -> list[Any]:
    return send(t, "conversation.item.create", item=message(role, text, **fields))


def failed(outs: list[Any]) -> Failed:
    assert len(outs) == 1 and isinstance(outs[0], Failed), outs
    return outs[0]


def text_mode(t: Translator) -> None:
    send(t, "session.update", session={"output_modalities": ["text"]})


def spoken_turn(t: Translator, n: int, words: tuple[str, ...] = ("a", " b")) -> tuple[str, str]:
    """An utterance the Session answers, and its finished reply: (user item, reply item)."""
    t.server(SpeechStartedEvent(f"u{n}", 0))
    user = t.server(SpeechStoppedEvent(f"u{n}", 0, 800))[2]["item"]["id"]
    reply = t.server(ReplyStarted(f"r{n}", f"u{n}"))[1]["item"]["id"]
    for w in words:
        t.server(ReplyDelta(f"r{n}", w))
    t.server(ReplyDone(f"r{n}", "".join(words), USAGE, TIMING))
    return user, reply


def test_a_system_message_is_appended_to_the_history() -> None:
    t = translator()
    outs = create(t, "system", "The user is in the kitchen.", id="sys1")
    assert types(outs) == ["Start", "Edit", "conversation.item.added", "conversation.item.done"]
    assert outs[1] == Edit(AppendMessage("system", "The user is in the kitchen."))
    item = outs[2]["item"]
    assert item["id"] == "sys1" and item["role"] == "system"
    assert item["content"] == [{"type": "input_text", "text": "The user is in the kitchen."}]
    assert send(t, "conversation.item.retrieve", item_id="sys1")[0]["item"] == item
    # the session has started: the next one is only an edit
    assert types(create(t, "system", "Now the garden.")) == [
        "Edit",
        "conversation.item.added",
        "conversation.item.done",
    ]


def test_an_assistant_message_is_appended_as_the_assistant() -> None:
    t = translator()
    outs = create(t, "assistant", "Welcome back!")
    assert outs[1] == Edit(AppendMessage("assistant", "Welcome back!"))
    assert outs[2]["item"]["content"] == [{"type": "output_text", "text": "Welcome back!"}]


def test_pending_user_text_goes_first_to_keep_the_order() -> None:
    t = translator()
    first = events(create(t, "user", "What is 2+2?"))[0]["item"]["id"]
    second = events(create(t, "user", "Answer in words."))[0]["item"]["id"]
    outs = create(t, "assistant", "Four.")
    assert [o for o in outs if isinstance(o, Edit)] == [
        Edit(AppendMessage("user", "What is 2+2?\nAnswer in words.")),
        Edit(AppendMessage("assistant", "Four.")),
    ]
    # nothing is pending now: a response is a reply to the history as it stands
    respond = send(t, "response.create")[-1]
    assert isinstance(respond, Respond) and respond.turn.text == SPEAK_FIRST
    # the items of that user message are the model's last user turn: deleting one
    # drops it whole, with the assistant message after it
    t.server(ReplyStarted("r1", None))
    t.server(ReplyDone("r1", "x", USAGE, TIMING))
    refused = failed(send(t, "conversation.item.delete", item_id=first))
    assert refused.exc.code == "unsupported"  # (the speak-first turn is the last one now)
    assert second in t.items


def test_a_message_after_pending_audio_is_refused_and_changes_nothing() -> None:
    t = translator()
    audio = {"type": "input_audio", "audio": b64(bytes(4800))}
    item = {"type": "message", "role": "user", "content": [audio]}
    user = events(send(t, "conversation.item.create", item=item))[0]["item"]["id"]
    refused = failed(create(t, "system", "note"))
    assert refused.exc.code == "unsupported" and refused.exc.param == "item.role"  # type: ignore[attr-defined]
    assert "response.create first" in str(refused.exc)
    assert t.items.ids() == [user] and user in t.items.pending
    assert failed(create(t, "system", "  ")).exc.code == "bad_message"  # no text


def test_instructions_cannot_change_once_a_message_was_appended() -> None:
    t = translator()
    create(t, "system", "context")
    outs = send(t, "session.update", session={"instructions": "new prompt"})
    assert isinstance(outs[-1], Failed) and outs[-1].exc.code == "unsupported"
    assert "a message appended" in str(outs[-1].exc)


def test_deleting_the_last_user_item_drops_its_turn() -> None:
    t = translator()
    text_mode(t)
    older, older_reply = spoken_turn(t, 1)
    user, reply = spoken_turn(t, 2)
    outs = send(t, "conversation.item.delete", item_id=user)
    assert outs[0] == Edit(DropTurns(1, submitted=True))
    assert [e["item_id"] for e in events(outs)] == [user, reply]
    assert all(e["type"] == "conversation.item.deleted" for e in events(outs))
    assert isinstance(send(t, "conversation.item.retrieve", item_id=reply)[0], Failed)
    # the turn before it is the last one now: its reply can be emptied
    assert send(t, "conversation.item.delete", item_id=older_reply)[0] == Edit(TruncateReply(0))
    # an out-of-band turn submitted since is counted (it is gone already): the
    # engine then drops the right turn even if this one never entered the history
    send(t, "response.create", response={"conversation": "none"})
    t.server(ReplyStarted("r9", None))
    t.server(ReplyDone("r9", "", USAGE, TIMING))
    # (the dropped turn 2 was submitted since too)
    assert Edit(DropTurns(3, submitted=True)) in send(t, "conversation.item.delete", item_id=older)


def test_deleting_the_last_user_item_while_its_reply_generates_cancels_it_first() -> None:
    t = translator()
    text_mode(t)
    t.server(SpeechStartedEvent("u1", 0))
    user = t.server(SpeechStoppedEvent("u1", 0, 800))[2]["item"]["id"]
    reply = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    t.server(ReplyDelta("r1", "half"))
    outs = send(t, "conversation.item.delete", item_id=user)
    assert types(outs) == [
        "StopAudio",
        "Cancel",
        "Edit",
        "conversation.item.deleted",
        "conversation.item.deleted",
    ]
    assert outs[2] == Edit(DropTurns(1, submitted=True))
    end = t.server(ReplyCancelled("r1", "client", "half"))
    assert not [o for o in end if isinstance(o, Edit)]  # the turn leaves whole: no other cut
    assert "response.done" in types(end)
    assert reply not in t.items


def test_deleting_older_items_is_refused_by_name() -> None:
    t = translator()
    text_mode(t)
    first_user, first_reply = spoken_turn(t, 1)
    spoken_turn(t, 2)
    for item_id in (first_user, first_reply):
        refused = failed(send(t, "conversation.item.delete", item_id=item_id))
        assert refused.exc.code == "unsupported"
        assert "only its end can be cut" in str(refused.exc)
    system = events(create(t, "system", "note"))[0]["item"]["id"]
    assert failed(send(t, "conversation.item.delete", item_id=system)).exc.code == "unsupported"


def test_deleting_the_last_reply_empties_it_in_the_history() -> None:
    t = translator()
    text_mode(t)
    _, reply = spoken_turn(t, 1, ("one", " two"))
    outs = send(t, "conversation.item.delete", item_id=reply)
    assert outs == [Edit(TruncateReply(0)), *events(outs)]
    assert types(outs)[1:] == ["conversation.item.deleted"]
    # a reply cancelled before its first token is empty in the history, or not in it
    t.server(SpeechStartedEvent("u2", 0))
    t.server(SpeechStoppedEvent("u2", 0, 800))
    second = t.server(ReplyStarted("r2", "u2"))[1]["item"]["id"]
    t.server(ReplyCancelled("r2", "barge_in", ""))
    assert types(send(t, "conversation.item.delete", item_id=second)) == [
        "conversation.item.deleted"
    ]


def test_deleting_a_user_item_whose_turn_waits_is_refused() -> None:
    t = translator()
    text_mode(t)
    t.server(SpeechStartedEvent("u1", 0))
    t.server(SpeechStoppedEvent("u1", 0, 800))
    t.server(ReplyStarted("r1", "u1"))
    t.server(SpeechStartedEvent("u2", 900))  # closes while r1 runs: the Session holds it
    waiting = t.server(SpeechStoppedEvent("u2", 900, 1500))[2]["item"]["id"]
    refused = failed(send(t, "conversation.item.delete", item_id=waiting))
    assert refused.exc.code == "unsupported" and "cancel that response first" in str(refused.exc)
    t.server(ReplyDone("r1", "", USAGE, TIMING))
    t.server(ReplyStarted("r2", "u2"))
    assert Edit(DropTurns(1, submitted=True)) in send(
        t, "conversation.item.delete", item_id=waiting
    )


def test_a_pending_item_just_leaves() -> None:
    t = translator()
    user = events(create(t, "user", "hello"))[0]["item"]["id"]
    assert types(send(t, "conversation.item.delete", item_id=user)) == ["conversation.item.deleted"]
    respond = send(t, "response.create")[-1]
    assert isinstance(respond, Respond) and respond.turn.text == SPEAK_FIRST


def test_a_turn_dropped_while_its_deleted_reply_settles_is_dropped_after_its_cut() -> None:
    t = translator()
    text_mode(t)
    spoken_turn(t, 1)
    t.server(SpeechStartedEvent("u2", 0))
    user = t.server(SpeechStoppedEvent("u2", 0, 800))[2]["item"]["id"]
    reply = t.server(ReplyStarted("r2", "u2"))[1]["item"]["id"]
    t.server(ReplyDelta("r2", "half"))
    assert types(send(t, "conversation.item.delete", item_id=reply)) == [
        "StopAudio",
        "Cancel",
        "Edit",  # TruncateReply(0), applied once the cancel has settled
        "conversation.item.deleted",
    ]
    outs = send(t, "conversation.item.delete", item_id=user)
    assert [o for o in outs if isinstance(o, Edit)] == [Edit(DropTurns(1, submitted=True))]
    end = t.server(ReplyCancelled("r2", "client", "half"))
    assert not [o for o in end if isinstance(o, Edit)]  # no TruncateReply(0) of the turn before
