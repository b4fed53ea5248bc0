"""The routing rule and the key on one real server (loopback, scripted engine):
`/v1/realtime?model=...` speaks OpenAI Realtime, without `model` the native
protocol; the key is checked like the native token, a wrong one is HTTP 401."""

from __future__ import annotations

import asyncio
import base64
import json

import numpy as np
import pytest
from openai import AsyncOpenAI
from websockets.asyncio.client import connect as ws_connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus

from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.openai_realtime import route
from voice_agent.transports.websocket import running_server

WAIT = 20.0


def echo(turn: TurnInput) -> str:
    return f"echo {turn.text}" if turn.text else "heard audio"


def test_the_rule_and_the_key() -> None:
    assert route.is_openai("/v1/realtime?model=qwen2-audio")
    assert route.is_openai("/v1/realtime?model=")
    assert not route.is_openai("/v1/realtime")
    assert not route.is_openai("/v1/other?model=x")
    assert route.api_key(Headers({"Authorization": "Bearer sk-1"})) == "sk-1"
    offered = Headers([("Sec-WebSocket-Protocol", "realtime, openai-insecure-api-key.sk-2")])
    assert route.api_key(offered) == "sk-2"
    assert route.api_key(Headers()) is None
    assert route.select_subprotocol(["openai-insecure-api-key.k", "realtime"]) == "realtime"
    assert route.select_subprotocol(["openai-insecure-api-key.k"]) == "openai-insecure-api-key.k"
    assert route.select_subprotocol([]) is None

    class Handshake:
        class request:  # a stand-in for websockets' Request
            path = "/v1/realtime?model=qwen2-audio&x=1"

    assert route.requested_model(Handshake()) == "qwen2-audio"
    assert route.requested_model(object()) is None


def speech_then_silence() -> bytes:
    t = np.arange(24000) / 24000
    voice = np.sin(2 * np.pi * 220 * t) * 8000 * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    return voice.astype("<i2").tobytes() + bytes(2 * 24000 * 2)


async def test_sdk_and_native_clients_on_one_server() -> None:
    config = Config(host="127.0.0.1", port=0, token="secret")
    async with running_server(config, ScriptedEngine(echo, token_delay=0.001)) as app:
        base = f"http://127.0.0.1:{app.port}/v1"
        client = AsyncOpenAI(base_url=base, api_key="secret")
        async with client.realtime.connect(model="qwen2-audio") as conn:
            created = await asyncio.wait_for(conn.recv(), WAIT)
            assert created.type == "session.created"
            assert created.session.model == "qwen2-audio"  # as asked, not the engine's path
            await conn.session.update(
                session={
                    "type": "realtime",
                    "instructions": "be brief",
                    "output_modalities": ["text"],
                }
            )
            updated = await asyncio.wait_for(conn.recv(), WAIT)
            assert updated.type == "session.updated"
            # a server-VAD voice turn answered with text deltas
            audio = speech_then_silence()
            for i in range(0, len(audio), 4800):
                chunk = base64.b64encode(audio[i : i + 4800]).decode()
                await conn.input_audio_buffer.append(audio=chunk)
            seen: list[str] = []
            async with asyncio.timeout(WAIT):
                async for event in conn:
                    seen.append(event.type)
                    if event.type == "response.done":
                        assert event.response.status == "completed"
                        break
            assert seen.index("input_audio_buffer.speech_started") < seen.index(
                "input_audio_buffer.committed"
            )
            assert "response.output_text.delta" in seen
            # a malformed event gets `error`, the connection lives on
            await conn.send({"type": "no.such.event", "event_id": "bad1"})  # type: ignore[arg-type]
            error = await asyncio.wait_for(conn.recv(), WAIT)
            while error.type == "rate_limits.updated":  # (follows response.done)
                error = await asyncio.wait_for(conn.recv(), WAIT)
            assert error.type == "error" and error.error.event_id == "bad1"
            await conn.conversation.item.create(
                item={
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "x"}],
                }
            )
            assert (await asyncio.wait_for(conn.recv(), WAIT)).type == "conversation.item.added"

        # the native protocol on the same server, same path, no `model`
        async with ws_connect(app.url) as native:
            await native.send(json.dumps({"type": "session.start", "token": "secret"}))
            assert json.loads(await native.recv())["type"] == "session.started"
            await native.send(json.dumps({"type": "text", "text": "hi"}))
            async with asyncio.timeout(WAIT):
                while (event := json.loads(await native.recv()))["type"] != "reply.done":
                    pass
            assert event["text"] == "echo hi"

        # a wrong key: refused at the handshake
        wrong = AsyncOpenAI(base_url=base, api_key="wrong")
        with pytest.raises(InvalidStatus) as refused:
            async with wrong.realtime.connect(model="qwen2-audio"):
                pass
        assert refused.value.response.status_code == 401

        # the browser way: the key as a subprotocol, `realtime` selected
        url = f"ws://127.0.0.1:{app.port}/v1/realtime?model=qwen2-audio"
        protocols = ["realtime", "openai-insecure-api-key.secret"]
        async with ws_connect(url, subprotocols=protocols) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "realtime"
            assert json.loads(await ws.recv())["type"] == "session.created"


async def test_new_turn_detection_restarts_the_session_on_its_conversation() -> None:
    config = Config(host="127.0.0.1", port=0)
    async with running_server(config, ScriptedEngine(echo, token_delay=0.001)) as app:
        client = AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="k")
        async with client.realtime.connect(model="qwen2-audio") as conn:
            assert (await asyncio.wait_for(conn.recv(), WAIT)).type == "session.created"
            text = {"type": "message", "role": "user", "content": []}
            text["content"] = [{"type": "input_text", "text": "first"}]
            await conn.conversation.item.create(item=text)  # type: ignore[arg-type]
            await conn.response.create()
            async with asyncio.timeout(WAIT):
                while (await conn.recv()).type != "response.done":
                    pass
            [first] = list(app.host.sessions)
            td = {"type": "server_vad", "silence_duration_ms": 900}
            await conn.session.update(session={"audio": {"input": {"turn_detection": td}}})
            async with asyncio.timeout(WAIT):
                while (event := await conn.recv()).type != "session.updated":
                    pass
            assert event.session.audio.input.turn_detection.silence_duration_ms == 900
            [live] = app.host.sessions.values()
            assert live.session_id == first  # the same conversation, its history kept
            assert live.session.config.vad.hangover_ms == 900
            assert "first" in app.engine.history_text(live.conversation)
