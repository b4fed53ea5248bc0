"""The connection's history edits and out-of-band responses with their own
input, through the OpenAI SDK on a real server (loopback, scripted engine)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai import AsyncOpenAI

from voice_agent.config import Config
from voice_agent.engine.base import Conversation, HistoryEdit, TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import WebSocketServerApp, running_server

WAIT = 20.0
TEXT = {"type": "realtime", "output_modalities": ["text"]}


def message(role: str, text: str) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def reply(turn: TurnInput) -> str:
    return "word " * 500 if turn.text == "long" else "Fine."  # long: five seconds


class NoEdits(ScriptedEngine):
    """An engine that cannot edit histories (Engine's default)."""

    def edit_history(self, conversation: Conversation, edit: HistoryEdit) -> asyncio.Future[bool]:
        raise NotImplementedError


async def serve(engine: ScriptedEngine) -> AsyncIterator[WebSocketServerApp]:
    async with running_server(Config(host="127.0.0.1", port=0), engine) as server:
        yield server


@pytest.fixture
async def app() -> AsyncIterator[WebSocketServerApp]:
    async for server in serve(ScriptedEngine(reply, token_delay=0.01)):
        yield server


@pytest.fixture
async def no_edits() -> AsyncIterator[WebSocketServerApp]:
    async for server in serve(NoEdits(reply, token_delay=0.01)):
        yield server


async def until(conn: Any, kind: str, seen: list[Any] | None = None, **match: Any) -> Any:
    async with asyncio.timeout(WAIT):
        async for event in conn:
            if seen is not None:
                seen.append(event)
            if event.type == kind and all(getattr(event, k) == v for k, v in match.items()):
                return event
    raise AssertionError(f"connection closed before {kind}")


def connect(app: WebSocketServerApp) -> Any:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="k")
    return client.realtime.connect(model="qwen2-audio")


async def test_an_engine_that_cannot_edit_refuses_the_edit_by_name(
    no_edits: WebSocketServerApp,
) -> None:
    async with connect(no_edits) as conn:
        await conn.session.update(session=TEXT)
        await conn.conversation.item.create(item=message("system", "note"))  # type: ignore[arg-type]
        error = await until(conn, "error")
        assert error.error.code == "unsupported"
        assert "history edits" in error.error.message
        # the connection lives on
        await conn.conversation.item.create(item=message("user", "hi"))  # type: ignore[arg-type]
        await conn.response.create()
        done = await until(conn, "response.done")
    assert done.response.status == "completed"


async def test_an_aside_runs_on_its_own_conversation_and_can_be_cancelled(
    app: WebSocketServerApp,
) -> None:
    engine = app.host.engine
    assert isinstance(engine, ScriptedEngine)
    async with connect(app) as conn:
        await conn.session.update(session=TEXT)
        await conn.conversation.item.create(item=message("user", "hello"))  # type: ignore[arg-type]
        await conn.response.create()
        await until(conn, "response.done")  # (the session's history: hello, Fine.)
        await conn.response.create(
            response={"conversation": "none", "input": [message("user", "weather?")]}  # type: ignore[typeddict-item]
        )
        first = await until(conn, "response.done")
        await conn.response.create(
            response={"conversation": "none", "input": [message("user", "long")]}  # type: ignore[typeddict-item]
        )
        created = await until(conn, "response.created")
        await until(conn, "response.output_text.delta")
        await conn.response.cancel(response_id=created.response.id)
        cancelled = await until(conn, "response.done")
        [live] = app.sessions.values()
        history = engine.history_text(live.conversation)
    assert first.response.status == "completed" and first.response.conversation_id is None
    assert first.response.output[0].content[0].text == "Fine."
    assert cancelled.response.id == created.response.id
    assert cancelled.response.status == "cancelled"
    # never in the session's history
    assert history.count("Fine.") == 1 and "weather?" not in history and "long" not in history
