"""Out-of-band responses with their own input (aside.py), event by event:
response.create with conversation "none" and `input` -> one Aside call, its
response beside the Session's (no network)."""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.transports.openai_realtime.support import b64, events, send, translator, types
from voice_agent.engine.types import AppendMessage
from voice_agent.protocol import ReplyCancelled, ReplyDelta, ReplyDone, ReplyStarted
from voice_agent.transports.openai_realtime.calls import (
    Aside,
    Cancel,
    CancelAside,
    Edit,
    Failed,
    StopAudio,
)
from voice_agent.transports.openai_realtime.translator import SPEAK_FIRST, Translator

USAGE = {"prompt_tokens": 9, "cached_tokens": 0, "completion_tokens": 1}


def text(role: str, value: str) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": value}]}


def aside(t: Translator, inputs: list[Any], **response: Any) -> list[Any]:
    body = {"conversation": "none", "input": inputs, **response}
    return send(t, "response.create", response=body)


def only_aside(outs: list[Any]) -> Aside:
    assert types(outs) == ["Aside"], outs
    call: Aside = outs[0]
    return call


def test_an_empty_input_is_a_reply_without_context() -> None:
    t = translator()
    send(t, "conversation.item.create", item=text("user", "pending"))
    call = only_aside(aside(t, [], metadata={"k": "v"}))
    assert call.messages == () and call.turn.text == SPEAK_FIRST and call.turn.audio is None
    assert call.system_prompt == "server prompt"  # the session's instructions
    assert len(t.items.pending) == 1  # the conversation is not touched
    opened = t.aside_started(call.reply_id)
    assert types(opened) == [
        "response.created",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert opened[0]["response"]["conversation_id"] is None
    assert opened[0]["response"]["metadata"] == {"k": "v"}
    t.server(ReplyDelta(call.reply_id, "ok"))
    end = t.server(ReplyDone(call.reply_id, "ok", USAGE, {}))
    assert not [o for o in end if isinstance(o, Edit)]  # never in the history: nothing to drop
    done = next(e for e in events(end) if e["type"] == "response.done")["response"]
    assert done["status"] == "completed" and done["output"][0]["content"][0]["transcript"] == "ok"
    assert "response.output_audio.done" not in types(end)  # never spoken


def test_the_input_becomes_the_history_and_the_turn() -> None:
    t = translator()
    audio = {"type": "input_audio", "audio": b64(np.full(4800, 1000, "<i2").tobytes())}
    question = {
        "type": "message",
        "role": "user",
        "content": [audio, text("user", "q")["content"][0]],
    }
    call = only_aside(
        aside(
            t,
            [text("system", "Classify."), text("user", "a"), text("assistant", "b"), question],
            instructions="You label topics.",
        )
    )
    assert call.system_prompt == "You label topics."
    assert call.messages == (
        AppendMessage("system", "Classify."),
        AppendMessage("user", "a"),
        AppendMessage("assistant", "b"),
    )
    assert call.turn.text == "q" and call.turn.audio is not None
    assert len(call.turn.audio) == 3200  # 200 ms at 16 kHz


def test_item_references_bring_the_items_text() -> None:
    t = translator()
    send(t, "session.update", session={"output_modalities": ["text"]})
    user = events(send(t, "conversation.item.create", item=text("user", "lights?")))[0]
    send(t, "response.create")
    reply = t.server(ReplyStarted("r1", None))[1]["item"]["id"]
    t.server(ReplyDelta("r1", "on"))
    t.server(ReplyDone("r1", "on", USAGE, {}))
    refs = [
        {"type": "item_reference", "id": user["item"]["id"]},
        {"type": "item_reference", "id": reply},
    ]
    call = only_aside(aside(t, [*refs, text("user", "Summarize.")]))
    assert call.messages == (AppendMessage("user", "lights?"), AppendMessage("assistant", "on"))
    assert call.turn.text == "Summarize."
    [unknown] = aside(t, [{"type": "item_reference", "id": "nope"}])
    assert isinstance(unknown, Failed) and unknown.exc.param == "response.input"  # type: ignore[attr-defined]


def test_what_an_input_cannot_hold_is_refused() -> None:
    t = translator()
    t.server(ReplyStarted("r0", "u0"))  # (a spoken user item: its audio is not kept)
    send(t, "input_audio_buffer.append", audio=b64(bytes(4800)))
    t.server(ReplyDone("r0", "x", USAGE, {}))
    audio_item = {
        "type": "message",
        "role": "user",
        "content": [{"type": "input_audio", "audio": b64(bytes(4800))}],
    }
    audio_id = events(send(t, "conversation.item.create", item=audio_item))[0]["item"]["id"]
    for inputs in (
        [{"type": "item_reference", "id": audio_id}],  # its audio is not kept
        [audio_item, text("assistant", "b")],  # audio before another message
    ):
        [refused] = aside(t, inputs)
        assert isinstance(refused, Failed) and refused.exc.code == "unsupported", inputs
    body = {"input": [], "conversation": "auto"}
    [auto] = send(t, "response.create", response=body)
    assert isinstance(auto, Failed) and auto.exc.code == "unsupported"


def test_asides_run_beside_the_sessions_responses() -> None:
    t = translator()
    r1 = t.server(ReplyStarted("r1", "u1"))[0]["response"]["id"]  # an in-band reply generating
    first = only_aside(aside(t, []))  # allowed while it runs
    opened = t.aside_started(first.reply_id)
    aside_id = opened[0]["response"]["id"]
    second = only_aside(aside(t, []))
    [busy] = aside(t, [])  # at most two at once
    assert isinstance(busy, Failed) and busy.exc.code == "busy"
    # the Session's next reply does not complete the aside, nor does cancel touch it
    t.server(ReplyDone("r1", "x", USAGE, {}))  # (its audio still goes out)
    started = t.server(ReplyStarted("r2", "u2"))
    assert [e["response"]["id"] for e in started if e["type"] == "response.done"] == [r1]
    assert types(send(t, "response.cancel")) == ["StopAudio", "Cancel"]
    assert send(t, "response.cancel", response_id=aside_id) == [CancelAside(first.reply_id)]
    end = t.server(ReplyCancelled(first.reply_id, "client", ""))
    done = next(e for e in events(end) if e["type"] == "response.done")["response"]
    assert done["id"] == aside_id and done["status"] == "cancelled"
    assert isinstance(StopAudio(), StopAudio) and isinstance(Cancel(), Cancel)
    assert second.reply_id != first.reply_id


def test_a_reference_to_a_reply_in_progress_brings_its_text_so_far() -> None:
    t = translator()  # (audio output: the reply stays open while its audio goes out)
    reply = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    t.server(ReplyDelta("r1", "The light"))
    call = only_aside(aside(t, [{"type": "item_reference", "id": reply}]))
    assert call.messages == (AppendMessage("assistant", "The light"),)
