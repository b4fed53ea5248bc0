"""Sessions on the WebSocket transport: resuming, audio in order, and the
server's lifecycle (graceful shutdown, `serve`, signals)."""

from __future__ import annotations

import asyncio
import signal
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

from tests.helpers.ports import free_port
from tests.helpers.servers import json_logs, server_process
from tests.helpers.waiting import until
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import (
    ErrorEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
)
from voice_agent.transports.websocket import WebSocketServerApp, running_server, serve

from . import ws_support
from .ws_support import WAIT, echo, http_get

pytestmark = pytest.mark.timeout(60)

# the fixtures of ws_support that the tests below use
web_dir = ws_support.web_dir
config = ws_support.config
app = ws_support.app


async def test_reconnect_with_session_id_resumes_the_conversation(config: Config) -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    async with running_server(config, engine) as app:
        async with RealtimeClient(app.url) as first:
            sid = (await first.start()).session_id
            await first.send_text("one")
            assert (await first.wait_for(ReplyDone, WAIT)).reply_id == "r1"
        await until(lambda: sid in app.host.conversations.kept)  # the server saw it go
        async with RealtimeClient(app.url) as again:
            assert (await again.start(session_id=sid)).session_id == sid
            await again.send_text("two")
            done = await again.wait_for(ReplyDone, WAIT)
            assert (done.reply_id, done.text) == ("r2", "echo two")
        async with RealtimeClient(app.url) as stranger:
            other = (await stranger.start(session_id="no-such-session")).session_id
            assert other not in (sid, "no-such-session")
    conversations = [conversation for conversation, _ in engine.submitted]
    assert len(conversations) == 2 and conversations[0] is conversations[1]


async def test_a_conversation_in_use_is_not_resumed_twice(config: Config) -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    async with (
        running_server(config, engine) as app,
        RealtimeClient(app.url) as first,
        RealtimeClient(app.url) as second,
    ):
        sid = (await first.start()).session_id
        assert (await second.start(session_id=sid)).session_id != sid
        assert len(app.sessions) == 2


async def test_audio_frames_take_the_fast_path_and_keep_their_order(
    app: WebSocketServerApp, audio_dir: Path
) -> None:
    """Binary frames that arrive while the handler waits are fed at once by
    the connection's audio sink (no queue or task switch); the session's
    events and the text that follows the audio come out as on the normal path."""
    from voice_agent.client import load_pcm, send_paced
    from voice_agent.protocol import SpeechStartedEvent, SpeechStoppedEvent

    audio = load_pcm(audio_dir / "ldc93s1-16k-mono.wav")
    async with RealtimeClient(app.url) as client:
        # session.start and audio right behind it, not waiting for the answer:
        # the frames must not overtake the start (no not_started error)
        await client.send_json({"type": "session.start"})
        for _ in range(5):
            await client.send_audio(bytes(640))
        await send_paced(client, audio, speed=2.0)
        await send_paced(client, audio, audio.silence(1.5), speed=2.0)
        await client.send_text("after the audio")
        first = await client.wait_for(ReplyDone, 30)
        second = await client.wait_for(ReplyDone, 30)
        assert (first.text, second.text) == ("heard audio", "echo after the audio")
        kinds = [type(e) for e in client.received]
        assert kinds.index(SpeechStartedEvent) < kinds.index(SpeechStoppedEvent)
        assert not client.of_type(ErrorEvent)
        # most of the ~250 frames went the fast way (some race the handler)
        assert app.fast_frames > 100


async def test_graceful_shutdown_closes_clients_with_1001(config: Config) -> None:
    engine = ScriptedEngine([" ".join(["long"] * 2000)], token_delay=0.01)
    stop = asyncio.Event()
    app = WebSocketServerApp(replace(config, drain_timeout=0), engine)
    await app.start()
    task = asyncio.create_task(app.serve_forever(stop))
    clients = [RealtimeClient(app.url) for _ in range(3)]
    try:
        for c in clients:
            await c.connect()
            await c.start()
            await c.send_text("talk for a while")
        for c in clients:
            await c.wait_for(ReplyDelta, WAIT)
        assert len(app.sessions) == 3
        stop.set()
        await asyncio.wait_for(task, 30)
        for c in clients:
            assert await c.wait_closed(WAIT) == 1001
            assert not c.of_type(ReplyDone)
            # no time to drain: the reply was cancelled, and the client was told
            assert [e.reason for e in c.of_type(ReplyCancelled)] == ["client"]
        assert not engine.started  # the engine was closed
        assert engine.runtime_stats().batch_size == 0  # no turn is left running
        assert not app.sessions
        with pytest.raises(OSError):  # no longer accepting
            await asyncio.open_connection("127.0.0.1", app.port)
    finally:
        for c in clients:
            await c.close()


async def test_serve_with_ready_and_stop(config: Config) -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    ready, stop = asyncio.Event(), asyncio.Event()
    port = free_port()  # a fixed free port: serve() does not report it
    task = asyncio.create_task(serve(replace(config, port=port), engine, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), WAIT)
    async with RealtimeClient(f"ws://127.0.0.1:{port}/v1/realtime") as client:
        await client.start()
        await client.send_text("hello")
        assert (await client.wait_for(ReplyDone)).text == "echo hello"
        stop.set()
        assert await client.wait_closed(WAIT) == 1001
    await asyncio.wait_for(task, WAIT)
    assert not engine.started


SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from voice_agent.config import Config
    from voice_agent.engine.scripted import ScriptedEngine
    from voice_agent.logs import setup_logging
    from voice_agent.server import run

    setup_logging("info", "json")
    run(Config(port=int(sys.argv[1])), ScriptedEngine([" ".join(["w"] * 5000)], token_delay=0.01))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_run_shuts_down_on_signal(sig: signal.Signals) -> None:
    port = free_port()
    async with server_process(SERVER_SCRIPT, port) as proc:
        async with asyncio.timeout(30):
            while True:
                try:
                    status, _, _ = await http_get(port, "/healthz")
                    if status == 200:
                        break
                except OSError:
                    await asyncio.sleep(0.1)
        async with RealtimeClient(f"ws://127.0.0.1:{port}/v1/realtime") as client:
            sid = (await client.start()).session_id
            await client.send_text("go")
            await client.wait_for(ReplyStarted)
            await client.wait_for(ReplyDelta)
            proc.send_signal(sig)
            assert await client.wait_closed(WAIT) == 1001
        assert await asyncio.wait_for(proc.wait(), WAIT) == 0
    logs = await json_logs(proc)
    messages = [rec["msg"] for rec in logs]
    assert any("serving http://127.0.0.1:" in m for m in messages)
    assert "server stopped" in messages
    started = [rec for rec in logs if rec["msg"] == "session started"]
    assert started and started[0]["session_id"] == sid
    assert all("w w w" not in line for line in messages)  # no reply text in logs
