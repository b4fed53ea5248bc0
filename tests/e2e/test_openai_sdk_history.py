"""The official `openai` SDK against a real voice_agent server on loopback:
what the client does to the conversation reaches the model's own history
(the engine's history_text, and its KV cache through usage.cached_tokens):
system and assistant messages, out-of-band responses (conversation "none"),
conversation.item.truncate of a finished reply, conversation.item.delete of
the last user item.

The tiny random Qwen2-Audio (its replies are noise: the tests look at the
history's shape, never at what is said); the scripted engine + Piper where a
reply must be spoken and cut at a word.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from tests.e2e.openai_support import (
    RATE,
    check_response,
    openai_server,
    pcm_of,
    realtime,
    respond,
    say,
    update_session,
)
from voice_agent.engine.base import Engine
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import WebSocketServerApp
from voice_agent.tts.speaker import Speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPLY = (
    "Sure, the kitchen light is on now. The living room stays dark as you asked. "
    "Anything else I can do for you this evening?"
)


def history(app: WebSocketServerApp, engine: Engine) -> str:
    """The model's history of the one conversation on the server."""
    [live] = app.sessions.values()
    return engine.history_text(live.conversation)


async def history_until(
    app: WebSocketServerApp, engine: Engine, ok: Callable[[str], bool], timeout: float = 30.0
) -> str:
    """The history once `ok` holds (history edits are applied on the engine
    without a wire event of their own); fails after `timeout` s."""
    text = history(app, engine)
    try:
        async with asyncio.timeout(timeout):
            while not ok(text):
                await asyncio.sleep(0.02)
                text = history(app, engine)
    except TimeoutError:
        raise AssertionError(f"the history did not become as expected: {text!r}") from None
    return text


async def create(conn: Any, log: Any, role: str, text: str) -> dict[str, Any]:
    """conversation.item.create of a message; its conversation.item.added."""
    n = len(log.of("conversation.item.added"))
    kind = "output_text" if role == "assistant" else "input_text"
    item = {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}
    await conn.send({"type": "conversation.item.create", "item": item})
    added: dict[str, Any] = await log.wait("conversation.item.added", n + 1)
    return added


def turns(text: str) -> list[str]:
    """The ChatML messages of a history, as "role\\ncontent"."""
    return [m.split("<|im_end|>")[0] for m in text.split("<|im_start|>")[1:]]


async def test_system_and_assistant_messages_join_the_history(
    tiny_engine: Qwen2AudioEngine,
) -> None:
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        system = await create(conn, log, "system", "The user is in the kitchen.")
        assert system["item"]["role"] == "system"
        await create(conn, log, "user", "Is the light on?")
        await create(conn, log, "assistant", "Yes, it is.")  # the pending user text goes first
        await say(conn, log, "Turn it off.")
        done = await respond(conn, log)
        check_response(log, done, modality="text")
        text = await history_until(app, tiny_engine, lambda t: len(turns(t)) >= 5)
    messages = turns(text)  # (the test server has no system prompt: ours is the first)
    assert messages[:4] == [
        "system\nThe user is in the kitchen.",
        "user\nIs the light on?",
        "assistant\nYes, it is.",
        "user\nTurn it off.",
    ], messages
    assert messages[4].startswith("assistant\n") and len(messages) == 5, messages


async def test_an_out_of_band_response_leaves_the_history_unchanged(
    tiny_engine: Qwen2AudioEngine,
) -> None:
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        await say(conn, log, "Hello there.")
        first = await respond(conn, log)
        before = history(app, tiny_engine)  # (settled before response.done)
        n = len(turns(before))
        assert turns(before)[-2:][0] == "user\nHello there.", before
        pending = await say(conn, log, "What is the topic so far?")
        meta = {"purpose": "classify"}
        oob = await respond(conn, log, conversation="none", metadata=meta)
        after = await history_until(app, tiny_engine, lambda t: t == before)
        # the pending item was still pending: an in-band response answers it now
        second = await respond(conn, log)
        text = await history_until(app, tiny_engine, lambda t: len(turns(t)) == n + 2)
    response = oob["response"]
    assert response["conversation_id"] is None and response["metadata"] == meta
    assert response["status"] in ("completed", "incomplete"), response
    [item] = response["output"]
    added = [e["item"]["id"] for e in log.of("conversation.item.added")]
    assert item["id"] not in added  # never in the conversation
    assert log.of("response.output_item.added", response_id=response["id"])
    assert first["response"]["conversation_id"] == second["response"]["conversation_id"]
    assert second["response"]["conversation_id"] is not None
    assert after == before
    assert turns(text)[n] == "user\nWhat is the topic so far?", text
    assert pending["item"]["id"] in added
    # the out-of-band turn was dropped from the KV cache too, not the history before it
    assert second["response"]["usage"]["input_token_details"]["cached_tokens"] > 0


async def test_truncating_a_finished_reply_cuts_the_history_and_the_cache(
    tiny_engine: Qwen2AudioEngine,
) -> None:
    """Text output has no audio: audio_end_ms 0 cuts the whole reply; the next
    turn's prompt finds the cache cropped to the first turn's prompt."""
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        await say(conn, log, "Tell me a long story.")
        first = await respond(conn, log)
        item = check_response(log, first, modality="text")
        assert first["response"]["usage"]["output_tokens"] > 0
        await conn.send(
            {
                "type": "conversation.item.truncate",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": 0,
            }
        )
        await log.wait("conversation.item.truncated")
        cut = await history_until(app, tiny_engine, lambda t: turns(t)[-1] == "assistant\n")
        await say(conn, log, "Go on.")
        second = await respond(conn, log)
    assert turns(cut)[-2] == "user\nTell me a long story."
    cached = second["response"]["usage"]["input_token_details"]["cached_tokens"]
    # cropped (not dropped): the first prompt is still cached, the cut reply is not
    assert 0 < cached <= first["response"]["usage"]["input_tokens"], (first, second)


async def test_truncating_a_spoken_reply_keeps_what_was_heard(piper: Speech) -> None:
    engine = ScriptedEngine([REPLY, "Yes."], token_delay=0.01)
    async with (
        openai_server(engine, speech=piper, max_new_tokens=1000) as app,
        realtime(app) as (conn, log),
    ):
        await update_session(conn, log, output_modalities=["audio"])
        await say(conn, log, "Lights please")
        done = await respond(conn, log)
        item = check_response(log, done, modality="audio")
        rid = done["response"]["id"]
        spoken_ms = (
            len(pcm_of(log.of("response.output_audio.delta", response_id=rid))) * 500 // RATE
        )
        await conn.send(
            {
                "type": "conversation.item.truncate",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": spoken_ms // 3,
            }
        )
        await log.wait("conversation.item.truncated")
        await conn.send({"type": "conversation.item.retrieve", "item_id": item["id"]})
        retrieved = await log.wait("conversation.item.retrieved")
        heard = retrieved["item"]["content"][0]["transcript"]
        assert 0 < len(heard) < len(REPLY) and REPLY.startswith(heard), heard
        text = await history_until(app, engine, lambda t: turns(t)[-1] != f"assistant\n{REPLY}")
    assert turns(text)[-1] == f"assistant\n{heard}", (text, heard)


async def test_deleting_the_last_user_item_drops_its_turn(tiny_engine: Qwen2AudioEngine) -> None:
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        await say(conn, log, "First question.")
        await respond(conn, log)
        before = history(app, tiny_engine)
        assert turns(before)[-2] == "user\nFirst question.", before
        second = await say(conn, log, "Second question.")
        done = await respond(conn, log)
        reply = check_response(log, done, modality="text")
        await conn.send({"type": "conversation.item.delete", "item_id": second["item"]["id"]})
        await log.wait("conversation.item.deleted", 2)
        after = await history_until(app, tiny_engine, lambda t: t == before)
        await say(conn, log, "Third question.")
        third = await respond(conn, log)
    deleted = [e["item_id"] for e in log.of("conversation.item.deleted")]
    assert deleted == [second["item"]["id"], reply["id"]]
    assert after == before
    # the cache was cropped back to the first turn: its prompt is still cached
    assert third["response"]["usage"]["input_token_details"]["cached_tokens"] > 0


async def test_an_out_of_band_response_with_its_own_input(tiny_engine: Qwen2AudioEngine) -> None:
    """input [] is a reply without the conversation; input messages and
    item_references are its whole context; the history is left alone."""
    story = " ".join(["The kitchen light is on and the oven is still warm."] * 8)
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        user = await say(conn, log, story)
        first = await respond(conn, log)
        before = history(app, tiny_engine)
        empty = await respond(conn, log, conversation="none", input=[], metadata={"kind": "none"})
        question = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "Say yes."}],
        }
        own = await respond(conn, log, conversation="none", input=[question])
        reference = {"type": "item_reference", "id": user["item"]["id"]}
        referenced = await respond(conn, log, conversation="none", input=[reference, question])
        after = history(app, tiny_engine)
    assert after == before
    prompt = {}
    for name, done in (("empty", empty), ("own", own), ("referenced", referenced)):
        response = done["response"]
        assert response["conversation_id"] is None and response["status"] in (
            "completed",
            "incomplete",
        ), (name, response)
        prompt[name] = response["usage"]["input_tokens"]
    assert empty["response"]["metadata"] == {"kind": "none"}
    story_tokens = first["response"]["usage"]["input_tokens"]
    # without the conversation: the story is not in their prompts, unless referenced
    assert max(prompt["empty"], prompt["own"]) < story_tokens < prompt["referenced"], (
        prompt,
        story_tokens,
    )


async def test_deleting_the_user_item_of_a_reply_in_progress(tiny_engine: Qwen2AudioEngine) -> None:
    """The reply is cancelled first (perhaps before its first token, when its
    turn never enters the history): the history is the first turn's either way."""
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        await say(conn, log, "First question.")
        await respond(conn, log)
        before = history(app, tiny_engine)
        second = await say(conn, log, "Second question.")
        await conn.send({"type": "response.create"})
        await log.wait("response.created", 2)
        await conn.send({"type": "conversation.item.delete", "item_id": second["item"]["id"]})
        await log.wait("conversation.item.deleted", 2)
        done = await log.wait("response.done", 2)
        after = await history_until(app, tiny_engine, lambda t: t == before)
    assert done["response"]["status"] in ("cancelled", "completed", "incomplete"), done
    assert after == before
