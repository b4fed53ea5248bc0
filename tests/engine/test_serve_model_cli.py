"""`voice-agent serve-model` as a real process on loopback, used by the remote engine."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.engines import collect
from tests.helpers.ports import free_port
from tests.helpers.processes import cli_process, stop_process, until_http_ok
from voice_agent import model_server
from voice_agent.cli import build_parser
from voice_agent.engine.base import TurnInput
from voice_agent.engine.openai import OpenAIEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.engine.tiny import DEMO_MODEL_KEY
from voice_agent.model_server import serving

pytestmark = pytest.mark.timeout(300)


def test_serve_model_flags_parse() -> None:
    args = build_parser().parse_args(
        ["serve-model", "--model", "DIR", "--port", "8000", "--engine-model", "qwen"]
    )
    assert args.command == "serve-model" and args.port == 8000 and args.engine_model == "qwen"
    serve = build_parser().parse_args(
        ["serve", "--engine", "openai", "--engine-url", "http://h:8000/v1"]
    )
    assert serve.engine == "openai" and serve.engine_url == "http://h:8000/v1"


class _Readiness(ScriptedEngine):
    """A ScriptedEngine whose ready() the test sets: True, False or "hang"."""

    state: bool | str = True

    async def ready(self) -> bool:
        if self.state == "hang":
            await asyncio.sleep(3600)
        return self.state is True


async def test_health_follows_the_engine_and_needs_no_api_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GET /health (the probe of deploy/k8s/model-deployment.yaml, as vLLM's):
    200 while engine.ready(), 503 when not or when it does not answer."""
    monkeypatch.setattr(model_server, "HEALTH_TIMEOUT", 0.2)
    engine = _Readiness(["hi"])
    async with (
        serving(engine, api_key="sk-health") as (_, port),
        aiohttp.ClientSession() as http,
    ):
        base = f"http://127.0.0.1:{port}"

        async def status(path: str) -> int:
            async with http.get(base + path) as resp:
                return resp.status

        assert await status("/health") == 200  # no Authorization header
        assert await status("/v1/models") == 401  # the API itself still needs the key
        engine.state = False
        assert await status("/health") == 503
        engine.state = "hang"
        assert await status("/health") == 503
        engine.state = True
        assert await status("/health") == 200
    await engine.close()


async def test_serve_model_process_answers_the_remote_engine(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    log = (tmp_path / "serve-model.log").open("w+")
    proc = cli_process(
        "serve-model",
        "--model",
        str(tiny_model_dir),
        "--port",
        str(port),
        "--engine-model",
        "tiny-qwen",
        "--max-new-tokens",
        "6",
        log=log,
        VOICE_AGENT_ENGINE_API_KEY="sk-cli-secret",
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        async with aiohttp.ClientSession() as http:
            await until_http_ok(http, f"http://127.0.0.1:{port}/health", proc)  # no key
            async with http.get(
                f"{url}/models", headers={"Authorization": "Bearer sk-cli-secret"}
            ) as resp:
                assert resp.status == 200
                models = (await resp.json())["data"]
                assert [m["id"] for m in models] == ["tiny-qwen"]
                assert models[0][DEMO_MODEL_KEY] is True  # --model DIR of make-tiny-model
        engine = OpenAIEngine(url, None, "sk-cli-secret")
        try:
            conv = engine.new_conversation()
            handle = engine.submit(conv, TurnInput(text="hello"))
            deltas = await collect(handle)
            assert deltas and handle.result.usage.completion_tokens <= 6
            assert engine.model_name == "tiny-qwen"
        finally:
            await engine.close()
        assert stop_process(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.seek(0)
        text = log.read()
        log.close()
    assert "sk-cli-secret" not in text
