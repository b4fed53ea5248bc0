"""The gateway (WebSocket server) on the remote engine, the model behind serve-model:
the deployment of deploy/README.md on loopback, tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect

from voice_agent.config import Config
from voice_agent.engine.loader import remote_engine
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.model_server import serving
from voice_agent.transports.websocket import running_server

pytestmark = pytest.mark.timeout(300)


async def test_gateway_conversation_through_serve_model(tiny_model_dir: Path) -> None:
    model = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=6)
    try:
        async with serving(model, served_name="tiny") as (server, port):
            config = Config(
                port=0,
                db="none",
                engine="openai",
                engine_url=f"http://127.0.0.1:{port}/v1",
                engine_model="tiny",
            )
            replies = []
            async with (
                running_server(config, remote_engine(config)) as app,
                ws_connect(app.url) as ws,
            ):
                await ws.send(json.dumps({"type": "session.start", "speak": False}))
                assert json.loads(await ws.recv())["type"] == "session.started"
                for text in ("hello", "and again"):
                    await ws.send(json.dumps({"type": "text", "text": text}))
                    for _ in range(200):
                        event = json.loads(await ws.recv())
                        if event["type"] in ("reply.done", "error"):
                            break
                    assert event["type"] == "reply.done", event
                    replies.append(event)
            assert server.stats["completed"] == 2 and server.stats["requests"] == 2
    finally:
        await model.close()
    assert all(r["text"] and r["usage"]["completion_tokens"] >= 1 for r in replies)
    first, second = (r["usage"] for r in replies)
    # The second turn's prompt carries the first turn (sent again by the gateway).
    assert second["prompt_tokens"] > first["prompt_tokens"] + first["completion_tokens"]
