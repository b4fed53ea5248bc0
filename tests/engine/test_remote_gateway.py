"""The gateway (WebSocket server) on the remote engine, the model behind serve-model:
the deployment of deploy/README.md on loopback, tiny model; in one process, and as
the two `voice-agent` processes of the deployment (with the gateway's /metrics)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect as ws_connect

from tests.helpers.ports import free_port
from tests.helpers.processes import cli_process, stop_process, until_http_ok
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.loader import remote_engine
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.model_server import serving
from voice_agent.protocol import ReplyDone
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


# ------------------------------------- the "done when", two processes


async def test_serve_model_and_gateway_processes_converse_and_count(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """`voice-agent serve-model --model DIR --port P` plus `voice-agent serve
    --engine openai --engine-url http://127.0.0.1:P/v1`: a realtime client's
    text turn gets a reply, and the gateway's /metrics counts it."""
    model_port, gateway_port = free_port(), free_port()
    model_log = (tmp_path / "serve-model.log").open("w+")
    gateway_log = (tmp_path / "serve.log").open("w+")
    procs: list[subprocess.Popen[str]] = []
    try:
        model = cli_process(
            "serve-model",
            "--model",
            str(tiny_model_dir),
            "--port",
            str(model_port),
            "--max-new-tokens",
            "6",
            log=model_log,
        )
        procs.append(model)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
            await until_http_ok(http, f"http://127.0.0.1:{model_port}/health", model)
            gateway = cli_process(
                "serve",
                "--engine",
                "openai",
                "--engine-url",
                f"http://127.0.0.1:{model_port}/v1",
                "--port",
                str(gateway_port),
                "--db",
                "none",
                "--tts",
                "none",
                log=gateway_log,
            )
            procs.append(gateway)
            gateway_url = f"http://127.0.0.1:{gateway_port}"
            await until_http_ok(http, f"{gateway_url}/readyz", gateway)

            async with RealtimeClient(f"ws://127.0.0.1:{gateway_port}/v1/realtime") as client:
                await client.start()
                await client.send_text("hello")
                done = await client.wait_for(ReplyDone, timeout=120)
            assert done.text.strip()

            async with http.get(f"{gateway_url}/metrics") as resp:
                assert resp.status == 200
                exposition = await resp.text()
        samples = {
            s.name: s.value
            for family in text_string_to_metric_families(exposition)
            for s in family.samples
            if not s.labels
        }
        assert samples["voice_agent_turns_total"] >= 1
        assert samples["voice_agent_ttft_seconds_count"] >= 1
        assert samples["voice_agent_tokens_generated_total"] >= 1
        assert [stop_process(p) for p in reversed(procs)] == [0, 0]  # both stop cleanly
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
        for log in (model_log, gateway_log):
            log.seek(0)
            print(log.name, log.read()[-3000:])  # shown when the test fails
            log.close()
