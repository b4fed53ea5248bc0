"""The Engine.edit_history contract (engine/base.py), the same on the scripted
engine, the Qwen2-Audio engine on the tiny model, the --engine-process proxy
and the remote engine (OpenAIEngine against serve-model on the tiny model)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.engines import collect
from voice_agent.engine.base import (
    AppendMessage,
    Conversation,
    DropTurns,
    Engine,
    TruncateReply,
    TurnInput,
    edit_future,
    resolve_threadsafe,
)
from voice_agent.engine.deferred import DeferredEngine
from voice_agent.engine.openai import OpenAIEngine
from voice_agent.engine.process import ProcessEngine
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import EngineError
from voice_agent.model_server import serving


@pytest.fixture(params=["scripted", "qwen2_audio", "process", "openai"])
async def engine(request: pytest.FixtureRequest, tiny_model_dir: Path) -> AsyncIterator[Engine]:
    made: Engine
    if request.param == "openai":
        backend = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=24)
        try:
            async with serving(backend) as (server, port):
                made = OpenAIEngine(f"http://127.0.0.1:{port}/v1", server.served_name)
                await made.start()
                yield made
                await made.close()
        finally:
            await backend.close()
        return
    if request.param == "scripted":
        made = ScriptedEngine(["alpha beta gamma delta epsilon zeta eta theta"], token_delay=0.001)
    elif request.param == "qwen2_audio":
        made = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=24)
    else:
        made = ProcessEngine(str(tiny_model_dir), max_new_tokens=24)
    await made.start()
    yield made
    await made.close()


async def say(engine: Engine, conv: Conversation, text: str) -> None:
    await collect(engine.submit(conv, TurnInput(text=text)))


async def test_edits_in_order_with_the_turns(engine: Engine) -> None:
    conv = engine.new_conversation(system_prompt="Be brief.")
    await say(engine, conv, "Zanzibar")
    await say(engine, conv, "Kathmandu")
    assert conv.turns == 2
    assert await engine.edit_history(conv, DropTurns(1))
    assert conv.turns == 2  # turns taken: an edit never lowers it
    history = engine.history_text(conv)
    assert "Zanzibar" in history and "Kathmandu" not in history
    snap = engine.snapshot(conv)
    assert snap is not None and snap.turns == 2
    assert [m["role"] for m in snap.messages if m["role"] != "system"] == ["user", "assistant"]

    assert await engine.edit_history(conv, TruncateReply(0))
    assert engine.history_text(conv).endswith("<|im_start|>assistant\n<|im_end|>\n")
    assert not await engine.edit_history(conv, TruncateReply(1))  # beyond the (empty) reply
    assert await engine.edit_history(conv, AppendMessage("system", "Answer in French."))
    assert engine.history_text(conv).endswith("<|im_start|>system\nAnswer in French.<|im_end|>\n")
    assert not await engine.edit_history(conv, TruncateReply(0))  # the last is not a reply
    assert not await engine.edit_history(conv, DropTurns(2))  # one turn only
    snap = engine.snapshot(conv)
    assert snap is not None and snap.messages[-1] == {
        "role": "system",
        "content": "Answer in French.",
    }
    await say(engine, conv, "Lhasa")  # the appended message is in the next turn's prompt
    history = engine.history_text(conv)
    assert history.index("Answer in French.") < history.index("<|im_start|>user\nLhasa")
    assert conv.turns == 3


async def test_a_cancelled_turn_settles_before_the_edit(engine: Engine) -> None:
    conv = engine.new_conversation()
    first = engine.submit(conv, TurnInput(text="Zanzibar"))
    pieces = aiter(first)
    await asyncio.wait_for(anext(pieces), timeout=60)  # started: a cancel settles it
    first.cancel(keep_tokens=0)
    dropped = engine.edit_history(conv, DropTurns(1))
    last = engine.submit(conv, TurnInput(text="Kathmandu"))
    async for _ in pieces:
        pass
    await collect(last)
    assert await dropped
    assert conv.turns == 2
    history = engine.history_text(conv)
    assert "Zanzibar" not in history and history.count("<|im_start|>user\n") == 1
    assert "<|im_start|>user\nKathmandu<|im_end|>" in history


async def test_drop_submitted_turns(engine: Engine) -> None:
    """DropTurns(submitted=True) after a turn cancelled before it started drops
    nothing older in its place; with n=2 it drops the turn before."""
    conv = engine.new_conversation()
    await say(engine, conv, "Zanzibar")
    running = engine.submit(conv, TurnInput(text="Kathmandu"))
    waiting = engine.submit(conv, TurnInput(text="Lhasa"))  # waits for "Kathmandu"
    waiting.cancel(keep_tokens=0)  # before it started: it leaves nothing
    nothing = engine.edit_history(conv, DropTurns(1, submitted=True))
    await collect(running)
    await collect(waiting)
    assert waiting.result.cancelled
    assert not await nothing
    history = engine.history_text(conv)
    assert "Kathmandu" in history and "Lhasa" not in history
    assert await engine.edit_history(conv, DropTurns(2, submitted=True))
    history = engine.history_text(conv)
    assert "Zanzibar" in history and "Kathmandu" not in history
    assert not await engine.edit_history(conv, DropTurns(2, submitted=True))  # both gone
    assert conv.turns == 2


async def test_an_edit_of_a_closed_engine_fails_with_engine_error(engine: Engine) -> None:
    conv = engine.new_conversation()
    await engine.close()
    with pytest.raises(EngineError):
        await engine.edit_history(conv, DropTurns())
    engine.edit_history(conv, AppendMessage("user", "x"))  # ignored: no warning


async def test_the_deferred_engine_forwards_edits_once_loaded() -> None:
    deferred = DeferredEngine(lambda: ScriptedEngine(["ok"], token_delay=0))
    with pytest.raises(EngineError, match="loading"):
        await deferred.edit_history(Conversation("c", None), DropTurns())
    await deferred.start()
    conv = deferred.new_conversation()
    await say(deferred, conv, "hi")
    assert await deferred.edit_history(conv, DropTurns())
    assert "hi" not in deferred.history_text(conv)
    await deferred.close()


async def test_resolve_threadsafe_settles_once() -> None:
    future = edit_future()
    await asyncio.to_thread(resolve_threadsafe, future, True)
    assert await future
    resolve_threadsafe(future, EngineError("late"))  # done already: nothing happens
    await asyncio.sleep(0)
    assert future.result() is True
