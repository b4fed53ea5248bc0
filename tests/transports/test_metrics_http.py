"""/metrics and /readyz of a real server on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import signal
import textwrap
import threading
from pathlib import Path

import pytest

from tests.helpers.ports import free_port
from tests.helpers.servers import json_logs, server_process
from voice_agent.audio import decode, frames, silence
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.deferred import DeferredEngine
from voice_agent.engine.scripted import ScriptedEngine, words
from voice_agent.protocol import ReplyDone, SpeechStoppedEvent
from voice_agent.transports.websocket import WebSocketServerApp, running_server

from .ws_support import http_get, scrape

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
REPLY = "It is a fine day for a walk by the sea."


@pytest.fixture
def config() -> Config:
    return Config(host="127.0.0.1", port=0, turn_detection="silence")


async def readyz(port: int) -> tuple[int, dict[str, object]]:
    status, headers, body = await http_get(port, "/readyz")
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


async def test_a_real_session_moves_the_metrics(config: Config, audio_dir: Path) -> None:
    engine = ScriptedEngine([REPLY], token_delay=0.001)
    async with running_server(config, engine) as app:
        before = await scrape(app.port)
        assert before["voice_agent_utterances_total"] == 0
        assert before["voice_agent_ttft_seconds_count"] == 0
        async with RealtimeClient(app.url) as client:
            await client.start()
            speech = decode(audio_dir / "ldc93s1-16k-mono.wav")
            for chunk in (silence(0.3), speech, silence(1.5)):
                for frame in frames(chunk):
                    await client.send_audio(frame)
            await client.wait_for(SpeechStoppedEvent)
            assert (await client.wait_for(ReplyDone)).text == REPLY
            await client.send_text("and a typed turn")
            await client.wait_for(ReplyDone)
            during = await scrape(app.port)
        async with asyncio.timeout(20):  # the session ends after the client has gone
            while app.sessions:
                await asyncio.sleep(0.02)
        after = await scrape(app.port)

    assert during["voice_agent_sessions_active"] == 1
    assert during["voice_agent_sessions_total"] == 1
    assert during["voice_agent_utterances_total"] == 1
    assert during["voice_agent_turns_total"] == 2
    assert during["voice_agent_ttft_seconds_count"] == 2
    assert during["voice_agent_tokens_generated_total"] == 2 * len(words(REPLY))
    assert during['voice_agent_turn_latency_seconds_count{transport="realtime"}'] == 2
    assert during['voice_agent_turn_latency_seconds_sum{transport="realtime"}'] > 0
    assert sum(v for k, v in during.items() if k.startswith("voice_agent_errors_total")) == 0
    # scrape-time figures are there: queues, the engine, the limit counters
    assert 'voice_agent_queue_depth{queue="send"}' in during
    assert 'voice_agent_queue_depth_max{queue="turns"}' in during
    assert during["voice_agent_engine_batch_size"] == 0  # both replies are done
    assert during["voice_agent_engine_kv_cache_bytes"] == 0  # the scripted engine has none
    assert during["voice_agent_auth_failures_total"] == 0
    assert after["voice_agent_sessions_active"] == 0
    assert after["voice_agent_sessions_total"] == 1


class Answering(ScriptedEngine):
    """A scripted engine whose `ready()` answers as told, or never."""

    answering = True
    hang = False

    async def ready(self) -> bool:
        if self.hang:
            await asyncio.sleep(3600)
        return self.answering and await super().ready()


async def wait_listening(app: WebSocketServerApp) -> int:
    async with asyncio.timeout(20):
        while True:
            try:
                return app.port
            except RuntimeError:  # not listening yet
                await asyncio.sleep(0.01)


async def test_readyz_is_503_until_the_model_is_loaded_and_answering(
    config: Config,
) -> None:
    loaded = threading.Event()
    inner = Answering(["hello"], token_delay=0.001)

    def load() -> Answering:  # the CLI's slow model load (loader.load_engine)
        assert loaded.wait(30)
        return inner

    app = WebSocketServerApp(config, DeferredEngine(load, "some/model"))
    start = asyncio.create_task(app.start())
    try:
        port = await wait_listening(app)
        # the port is open while the model loads: alive, not ready
        status, body = await readyz(port)
        assert status == 503 and body["status"] == "loading" and body["model"] == "some/model"
        assert "loading_s" in body
        status, _, _ = await http_get(port, "/healthz")
        assert status == 200
        async with RealtimeClient(app.url) as client:  # turned away: try again later
            assert await client.wait_closed(20) == 1013
            assert client.ws.close_reason is not None and "loading" in client.ws.close_reason
        assert (await scrape(port))["voice_agent_sessions_total"] == 0
        assert not start.done()

        loaded.set()
        await asyncio.wait_for(start, 20)
        status, body = await readyz(port)
        assert (status, body["status"], body["model"]) == (200, "ready", "scripted")
        async with RealtimeClient(app.url) as client:
            await client.start()
            await client.send_text("hi")
            assert (await client.wait_for(ReplyDone)).text == "hello"

        inner.answering = False  # the engine stopped answering
        status, body = await readyz(port)
        assert status == 503 and body["status"] == "not_ready"
        app.routes.ready_timeout = 0.2
        inner.answering, inner.hang = True, True  # its check hangs: not ready either
        status, body = await readyz(port)
        assert status == 503 and body["status"] == "not_ready"
        inner.hang = False
        assert (await readyz(port))[0] == 200
    finally:
        loaded.set()
        await asyncio.gather(start, return_exceptions=True)
        await app.shutdown()
    assert await app.readiness() == (503, {"status": "stopping", "model": "scripted"})


async def test_a_failed_engine_start_closes_the_port(config: Config) -> None:
    class Broken(ScriptedEngine):
        async def start(self) -> None:
            raise RuntimeError("no GPU")

    app = WebSocketServerApp(config, Broken())
    with pytest.raises(RuntimeError, match="no GPU"):
        await app.start()
    port = app.port  # it did listen
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await app.shutdown()


LOADING_SERVER = textwrap.dedent(
    """
    import sys, time
    from voice_agent.config import Config
    from voice_agent.engine.deferred import DeferredEngine
    from voice_agent.logs import setup_logging
    from voice_agent.server import run

    setup_logging("info", "json")
    config = Config(port=int(sys.argv[1]), turn_detection="silence", db="none", tts="none")
    run(config, DeferredEngine(lambda: time.sleep(3600), "slow/model", progress_every=0.2))
    """
)


async def test_a_signal_while_the_model_loads_stops_the_server_at_once() -> None:
    port = free_port()
    async with server_process(LOADING_SERVER, port) as proc:
        async with asyncio.timeout(30):
            while True:
                try:
                    status, _ = await readyz(port)
                    break
                except OSError:
                    await asyncio.sleep(0.1)
        assert status == 503
        proc.send_signal(signal.SIGTERM)
        # the load (an hour) is not waited for
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    messages = [rec["msg"] for rec in await json_logs(proc)]
    assert any(m.startswith("loading the model") for m in messages)
    assert "server stopped" in messages
