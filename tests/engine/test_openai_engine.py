"""The remote engine (engine/openai.py) against `serve-model` (model_server.py) on loopback.

Real HTTP on 127.0.0.1, the real Qwen2-Audio classes on the tiny model (greedy),
and a scripted engine behind the server where a slow reply is needed (cancel).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers.engines import collect
from tests.helpers.ports import free_port
from voice_agent.config import Config
from voice_agent.engine.base import AudioArray, Engine, TurnInput
from voice_agent.engine.loader import remote_engine
from voice_agent.engine.openai import OpenAIEngine, wav_base64
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import BackendUnavailable, ConfigError, EngineError, to_wire
from voice_agent.model_server import ModelServer, serving

pytestmark = pytest.mark.timeout(300)

Serve = Callable[..., Any]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """serve(engine, **kw) -> (ModelServer, base URL); everything is closed afterwards."""
    async with AsyncExitStack() as stack:

        async def start(engine: Engine, port: int = 0, **kwargs: Any) -> tuple[ModelServer, str]:
            stack.push_async_callback(engine.close)
            server, bound = await stack.enter_async_context(
                serving(engine, "127.0.0.1", port, **kwargs)
            )
            return server, f"http://127.0.0.1:{bound}/v1"

        yield start


@pytest.fixture
async def remote() -> AsyncIterator[Callable[..., OpenAIEngine]]:
    engines: list[OpenAIEngine] = []

    def make(url: str, model: str | None = None, **kwargs: Any) -> OpenAIEngine:
        engine = OpenAIEngine(url, model, **kwargs)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        await engine.close()


def tiny(tiny_model_dir: Path, **kwargs: Any) -> Qwen2AudioEngine:
    kwargs.setdefault("max_new_tokens", 8)
    return Qwen2AudioEngine(str(tiny_model_dir), **kwargs)


async def local_replies(tiny_model_dir: Path, turns: list[TurnInput]) -> list[str]:
    engine = tiny(tiny_model_dir)
    await engine.start()
    try:
        conv = engine.new_conversation()
        out = []
        for turn in turns:
            handle = engine.submit(conv, turn)
            await collect(handle)
            out.append(handle.result.text)
        return out
    finally:
        await engine.close()


async def test_text_turn_streams_the_local_engines_reply(
    tiny_model_dir: Path, serve: Serve, remote: Callable[..., OpenAIEngine]
) -> None:
    server, url = await serve(tiny(tiny_model_dir))
    engine = remote(url, server.served_name)
    await engine.start()
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(text="Hello there"))
    deltas = await collect(handle)
    result = handle.result
    assert deltas and [d.tokens for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d.text for d in deltas) == result.text
    assert result.usage.prompt_tokens > 5 and result.usage.completion_tokens >= 1
    assert not result.cancelled
    assert [result.text] == await local_replies(tiny_model_dir, [TurnInput(text="Hello there")])
    assert server.stats["completed"] == 1


async def test_audio_turn_and_history_are_sent(
    tiny_model_dir: Path,
    short_speech: AudioArray,
    serve: Serve,
    remote: Callable[..., OpenAIEngine],
) -> None:
    server, url = await serve(tiny(tiny_model_dir))
    engine = remote(url)  # the model name comes from GET /models
    turns = [TurnInput(audio=short_speech[:24000]), TurnInput(text="And then?")]
    conv = engine.new_conversation()
    first = engine.submit(conv, turns[0])
    assert await collect(first)
    assert engine.model_name == server.served_name
    # 1.5 s of audio is about 37 audio tokens in the prompt.
    assert first.result.usage.prompt_tokens > 30
    second = engine.submit(conv, turns[1])
    await collect(second)
    sent = engine.messages(conv)
    assert [m["role"] for m in sent] == ["user", "assistant", "user", "assistant"]
    assert sent[0]["content"][0]["type"] == "input_audio"
    assert sent[1]["content"] == first.result.text
    # The second prompt holds the first turn (its audio and reply) too.
    assert second.result.usage.prompt_tokens > (
        first.result.usage.prompt_tokens + first.result.usage.completion_tokens
    )
    assert conv.turns == 2 and conv.audio_clips == 1
    local = await local_replies(tiny_model_dir, turns)
    assert [first.result.text, second.result.text] == local


async def test_cancel_closes_the_stream(serve: Serve, remote: Callable[..., OpenAIEngine]) -> None:
    backend = ScriptedEngine([" ".join(["word"] * 2000)], token_delay=0.01)
    server, url = await serve(backend)
    engine = remote(url, server.served_name)
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(text="talk"), max_new_tokens=2000)
    pieces = []
    async for delta in handle:
        pieces.append(delta.text)
        if len(pieces) == 3:
            handle.cancel(keep_tokens=2)
    result = handle.result
    assert result.cancelled and result.text == "".join(pieces[:2])
    assert len(pieces) < 2000
    for _ in range(500):  # the server notices the closed stream and stops decoding
        if server.stats["cancelled"] == 1 and not backend.runtime_stats().batch_size:
            break
        await asyncio.sleep(0.01)
    assert server.stats["cancelled"] == 1 and server.stats["completed"] == 0
    assert not backend.runtime_stats().batch_size
    assert engine.messages(conv)[-1] == {"role": "assistant", "content": result.text}
    # The next turn of the conversation runs normally.
    backend.replies = ["fine then"]
    nxt = engine.submit(conv, TurnInput(text="short please"))
    assert "".join(d.text for d in await collect(nxt)) == "fine then"
    assert not nxt.result.cancelled


async def test_backend_down_fails_the_turn_then_recovers(
    tiny_model_dir: Path, serve: Serve, remote: Callable[..., OpenAIEngine]
) -> None:
    port = free_port()
    engine = remote(f"http://127.0.0.1:{port}/v1", "tiny", retries=1, retry_delay=0.01)
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(text="anyone there?"))
    with pytest.raises(BackendUnavailable) as info:
        await collect(handle)
    wire = to_wire(info.value)
    assert wire.code == "internal" and "unreachable" in wire.message
    assert engine.stats["retries"] == 1 and engine.stats["requests"] == 2
    assert engine.messages(conv) == [] and conv.turns == 0

    await serve(tiny(tiny_model_dir), port=port, served_name="tiny")
    again = engine.submit(conv, TurnInput(text="anyone there?"))
    assert await collect(again)
    assert conv.turns == 1 and len(engine.messages(conv)) == 2


async def test_errors_are_openai_style(
    tiny_model_dir: Path, serve: Serve, remote: Callable[..., OpenAIEngine]
) -> None:
    server, url = await serve(tiny(tiny_model_dir))
    wrong = remote(url, "no-such-model")
    handle = wrong.submit(wrong.new_conversation(), TurnInput(text="hi"))
    with pytest.raises(EngineError, match="HTTP 404"):
        await collect(handle)

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{url}/models") as resp:
            assert resp.status == 200
            assert [m["id"] for m in (await resp.json())["data"]] == [server.served_name]

        async def post(body: Any) -> tuple[int, dict[str, Any]]:
            data = body if isinstance(body, bytes) else None
            kwargs: dict[str, Any] = {"data": data} if data is not None else {"json": body}
            async with http.post(f"{url}/chat/completions", **kwargs) as resp:
                return resp.status, await resp.json()

        user = {"role": "user", "content": "hi"}
        status, body = await post({"model": "nope", "messages": [user]})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        name = server.served_name
        for bad in (
            b"{not json",
            {"messages": [user]},
            {"model": name, "messages": []},
            {"model": name, "messages": [user, {"role": "assistant", "content": "x"}]},
            {"model": name, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
            {
                "model": name,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "%%%"}}],
                    }
                ],
            },
            {"model": name, "messages": [user], "max_tokens": 0},
        ):
            status, body = await post(bad)
            assert status == 400, bad
            assert body["error"]["type"] == "invalid_request_error"
            assert isinstance(body["error"]["message"], str)
        assert server.stats["completed"] == 0


async def test_non_streaming_reply_matches_streaming(
    tiny_model_dir: Path, short_speech: AudioArray, serve: Serve
) -> None:
    server, url = await serve(tiny(tiny_model_dir))
    audio_part = {
        "type": "input_audio",
        "input_audio": {"data": wav_base64(short_speech[:16000]), "format": "wav"},
    }
    body = {
        "model": server.served_name,
        "messages": [
            {"role": "user", "content": [audio_part, {"type": "text", "text": "What is it?"}]}
        ],
    }
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{url}/chat/completions", json=body) as resp:
            assert resp.status == 200
            reply = await resp.json()
        async with http.post(
            f"{url}/chat/completions",
            json={**body, "stream": True, "stream_options": {"include_usage": True}},
        ) as resp:
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            events = [line.decode().strip() async for line in resp.content]
    data = [e[len("data: ") :] for e in events if e.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert reply["object"] == "chat.completion"
    assert reply["choices"][0]["message"]["content"] == streamed
    assert chunks[-1]["usage"] == reply["usage"]
    assert reply["usage"]["total_tokens"] == (
        reply["usage"]["prompt_tokens"] + reply["usage"]["completion_tokens"]
    )
    assert reply["choices"][0]["finish_reason"] in ("stop", "length")


async def test_api_key_is_required_and_never_logged(
    tiny_model_dir: Path,
    serve: Serve,
    remote: Callable[..., OpenAIEngine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-test-0123456789"
    server, url = await serve(tiny(tiny_model_dir), api_key=secret)
    anonymous = remote(url, server.served_name)
    with pytest.raises(EngineError, match="HTTP 401"):
        await collect(anonymous.submit(anonymous.new_conversation(), TurnInput(text="hi")))
    keyed = remote(url, server.served_name, api_key=secret)
    assert await collect(keyed.submit(keyed.new_conversation(), TurnInput(text="hi")))
    assert secret not in repr(keyed)
    assert secret not in caplog.text


def test_config_and_loader_select_the_remote_engine() -> None:
    with pytest.raises(ConfigError, match="engine_url"):
        Config(engine="openai")
    with pytest.raises(ConfigError, match="engine must be"):
        Config(engine="vllm")
    config = Config.from_sources(
        None,
        {
            "VOICE_AGENT_ENGINE": "openai",
            "VOICE_AGENT_ENGINE_URL": "http://127.0.0.1:9/v1/",
            "VOICE_AGENT_ENGINE_MODEL": "qwen2-audio",
            "VOICE_AGENT_ENGINE_API_KEY": "sk-x",
        },
    )
    engine = remote_engine(config)
    assert isinstance(engine, OpenAIEngine)
    assert engine.base_url == "http://127.0.0.1:9/v1" and engine.model_name == "qwen2-audio"
    assert "sk-x" not in repr(config) and Config().engine == "local"


def test_wav_base64_round_trips(short_speech: AudioArray) -> None:
    from voice_agent.audio import decode

    back = decode(base64.b64decode(wav_base64(short_speech[:8000])))
    assert len(back) == 8000 and abs(float(back[4000]) - float(short_speech[4000])) < 1e-3


async def test_stalled_backend_times_out_the_turn(
    serve: Serve, remote: Callable[..., OpenAIEngine]
) -> None:
    backend = ScriptedEngine(["never arrives"], token_delay=30.0)
    server, url = await serve(backend)
    engine = remote(url, server.served_name, read_timeout=0.5)
    handle = engine.submit(engine.new_conversation(), TurnInput(text="hello?"))
    with pytest.raises(BackendUnavailable, match="timed out"):
        await collect(handle)
    for _ in range(500):  # the server sees the closed stream and cancels its turn
        if server.stats["cancelled"] == 1:
            break
        await asyncio.sleep(0.01)
    assert server.stats["cancelled"] == 1


async def test_a_stream_cut_short_fails_the_turn(remote: Callable[..., OpenAIEngine]) -> None:
    async def cut(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunk = {"choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": None}]}
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write_eof()  # no [DONE]
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", cut)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        engine = remote(f"http://127.0.0.1:{port}/v1", "m")
        conv = engine.new_conversation()
        handle = engine.submit(conv, TurnInput(text="hi"))
        pieces = []
        with pytest.raises(BackendUnavailable, match="early"):
            async for delta in handle:
                pieces.append(delta.text)
        assert pieces == ["half"] and conv.turns == 0 and engine.messages(conv) == []
    finally:
        await runner.cleanup()


async def test_snapshot_and_restore_use_the_shared_history_format(
    tiny_model_dir: Path,
    short_speech: AudioArray,
    serve: Serve,
    remote: Callable[..., OpenAIEngine],
) -> None:
    server, url = await serve(tiny(tiny_model_dir))
    first = remote(url, server.served_name)
    conv = first.new_conversation("Be brief.", "c1")
    await collect(first.submit(conv, TurnInput(audio=short_speech[:16000], text="What?")))
    history = first.snapshot(conv)
    assert history is not None and history.turns == 1 and len(history.clips) == 1
    user = history.messages[1]
    assert history.messages[0] == {"role": "system", "content": "Be brief."}
    assert user["content"] == [
        {"type": "audio", "audio": "clip-1"},
        {"type": "text", "text": "What?"},
    ]
    assert "input_audio" not in json.dumps(history.messages)  # no audio inside messages

    second = remote(url, server.served_name)
    restored = second.restore("c1", "Be brief.", history)
    assert restored.turns == 1 and restored.audio_clips == 1
    sent = second.messages(restored)
    assert sent[1]["content"][0]["type"] == "input_audio"
    assert sent[1]["content"][0]["input_audio"]["data"] == wav_base64(history.clips[0])
    handle = second.submit(restored, TurnInput(text="And?"))
    await collect(handle)
    assert restored.turns == 2 and len(second.messages(restored)) == 5

    # A local engine's snapshot (the same format, plus ids) continues remotely too.
    local = tiny(tiny_model_dir)
    await local.start()
    try:
        lconv = local.new_conversation()
        await collect(local.submit(lconv, TurnInput(audio=short_speech[:16000])))
        lhistory = local.snapshot(lconv)
    finally:
        await local.close()
    assert lhistory is not None
    moved = second.restore("c2", None, lhistory)
    assert await collect(second.submit(moved, TurnInput(text="Go on")))
    assert moved.turns == 2 and moved.audio_clips == 1


async def test_client_gone_cancels_a_non_streaming_request(serve: Serve) -> None:
    backend = ScriptedEngine([" ".join(["word"] * 200)], token_delay=0.05)
    server, url = await serve(backend)
    body = {"model": server.served_name, "messages": [{"role": "user", "content": "talk"}]}
    async with aiohttp.ClientSession() as http:

        async def ask() -> None:
            async with http.post(f"{url}/chat/completions", json=body) as resp:
                await resp.read()

        request = asyncio.create_task(ask())
        for _ in range(500):
            if backend.submitted:
                break
            await asyncio.sleep(0.01)
        assert backend.submitted and not request.done()
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
    for _ in range(500):
        if server.stats["cancelled"] == 1 and not backend.runtime_stats().batch_size:
            break
        await asyncio.sleep(0.01)
    assert server.stats["cancelled"] == 1 and server.stats["completed"] == 0
    assert not backend.runtime_stats().batch_size


async def test_ready_and_runtime_stats_follow_the_backend(
    serve: Serve, remote: Callable[..., OpenAIEngine]
) -> None:
    port = free_port()
    engine = remote(f"http://127.0.0.1:{port}/v1")
    assert not await engine.ready()  # not started
    await engine.start()
    assert not await engine.ready()  # nothing listens there yet
    await serve(ScriptedEngine(["one two three"], token_delay=0.01), port=port)
    assert await engine.ready()
    handle = engine.submit(engine.new_conversation(), TurnInput(text="hi"))
    assert engine.runtime_stats().batch_size == 1  # this gateway's turns in flight
    await collect(handle)
    assert engine.runtime_stats().batch_size == 0
    assert engine.runtime_stats().kv_cache_bytes == 0  # the cache is the backend's
    await engine.close()
    assert not await engine.ready()
