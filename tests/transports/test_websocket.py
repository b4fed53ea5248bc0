"""The WebSocket transport on a real server on a free loopback port."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import (
    ErrorEvent,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
)
from voice_agent.transports.websocket import (
    WebSocketServerApp,
    resolve_static,
    running_server,
    serve,
)

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]

ServerFactory = Callable[..., AbstractAsyncContextManager[WebSocketServerApp]]


@pytest.fixture
def web_dir(tmp_path: Path) -> Path:
    web = tmp_path / "web"
    (web / "js").mkdir(parents=True)
    (web / "index.html").write_text("<!doctype html><title>voice agent</title>")
    (web / "js" / "app.js").write_text("export const x = 1;\n")
    (web / "style.css").write_text("body { color: black }\n")
    (web / "icon.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (web / "manifest.json").write_text("{}")
    (web / ".env").write_text("SECRET=1")
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    (web / "escape").symlink_to(tmp_path / "secret.txt")
    return web


@pytest.fixture
def config(web_dir: Path) -> Config:
    return Config(host="127.0.0.1", port=0, web_dir=str(web_dir), ping_interval=5.0)


def echo(turn: TurnInput) -> str:
    return f"echo {turn.text}" if turn.text else "heard audio"


@pytest.fixture
async def app(config: Config) -> AsyncIterator[WebSocketServerApp]:
    async with running_server(config, ScriptedEngine(echo, token_delay=0.001)) as server:
        yield server


async def http_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP/1.1 GET (no client-side path normalisation)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 20)
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers, body


# ------------------------------------------------------------------- HTTP


async def test_static_files_with_content_types(app: WebSocketServerApp) -> None:
    status, headers, body = await http_get(app.port, "/")
    assert status == 200 and b"voice agent" in body
    assert headers["content-type"].startswith("text/html")
    expected = {
        "/index.html": "text/html",
        "/js/app.js": "text/javascript",
        "/style.css": "text/css",
        "/icon.svg": "image/svg+xml",
        "/manifest.json": "application/json",
    }
    for path, kind in expected.items():
        status, headers, _ = await http_get(app.port, path)
        assert status == 200, path
        assert headers["content-type"].startswith(kind), path
        assert headers["x-content-type-options"] == "nosniff"
    status, _, body = await http_get(app.port, "/js/app.js?v=3")
    assert status == 200 and body == b"export const x = 1;\n"


async def test_healthz_and_metrics(app: WebSocketServerApp) -> None:
    status, headers, body = await http_get(app.port, "/healthz")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "status": "ok",
        "model": "scripted",
        "demo_model": False,
        "sessions": 0,
    }
    async with RealtimeClient(app.url) as client:
        await client.start()
        await client.send_text("hi")
        await client.wait_for(ReplyDone)
        _, _, body = await http_get(app.port, "/healthz")
        assert json.loads(body)["sessions"] == 1
        status, headers, body = await http_get(app.port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    metrics = dict(
        line.split(" ") for line in body.decode().splitlines() if not line.startswith("#")
    )
    assert metrics["voice_agent_sessions_active"] == "1"
    assert metrics["voice_agent_sessions_total"] == "1"
    assert metrics["voice_agent_turns_total"] == "1"
    assert {"voice_agent_utterances_total", "voice_agent_barge_ins_total"} <= set(metrics)
    assert metrics["voice_agent_errors_total"] == "0"


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/js/../../secret.txt",
        "/%2E%2E%5Csecret.txt",
        "/escape",
        "/.env",
        "/js/%00.js",
    ],
)
async def test_path_traversal_is_refused(app: WebSocketServerApp, path: str) -> None:
    status, _, body = await http_get(app.port, path)
    assert status == 404
    assert b"SECRET" not in body


def test_resolve_static(web_dir: Path) -> None:
    assert resolve_static(web_dir, "/") == (web_dir / "index.html").resolve()
    assert resolve_static(web_dir, "/js/app.js") == (web_dir / "js" / "app.js").resolve()
    assert resolve_static(web_dir, "/js/../index.html") is None
    assert resolve_static(web_dir, "/nope.js") is None
    assert resolve_static(web_dir / "missing", "/") is None


async def test_unknown_paths_are_404(app: WebSocketServerApp) -> None:
    for path in ("/nope", "/v1/other", "/v1/realtime/extra", "/js/missing.js"):
        status, _, _ = await http_get(app.port, path)
        assert status == 404, path
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(f"ws://127.0.0.1:{app.port}/v2/realtime"):
            pass
    assert info.value.response.status_code == 404


# ---------------------------------------------------------------- protocol


async def _keep_talking(url: str, stop: asyncio.Event, done: list[str]) -> int | None:
    """A well-behaved client: text turns back to back until `stop`; every
    reply must arrive, and nothing else may go wrong."""
    async with RealtimeClient(url) as client:
        await client.start()
        n = 0
        while not stop.is_set() or n < 3:
            n += 1
            await client.send_text(f"turn {n}")
            reply = await client.wait_for(ReplyDone, 20)
            done.append(reply.text)
        assert not client.of_type(ErrorEvent)
        return client.close_code


async def test_malformed_messages_while_another_client_is_served(
    app: WebSocketServerApp,
) -> None:
    stop = asyncio.Event()
    replies: list[str] = []
    other = asyncio.create_task(_keep_talking(app.url, stop, replies))
    try:
        async with RealtimeClient(app.url) as client:

            async def expect(code: str) -> None:
                error = await client.wait_for(ErrorEvent, 10)
                assert error.code == code

            await client.send_raw(b"\x01\x00")  # audio before session.start
            await expect("not_started")
            await client.send_raw(json.dumps({"type": "text", "text": "hi"}))
            await expect("not_started")
            await client.send_raw("this is not JSON")
            await expect("bad_message")
            await client.send_raw(json.dumps({"type": "does.not.exist"}))
            await expect("bad_message")
            await client.send_raw(json.dumps({"no_type": 1}))
            await expect("bad_message")
            await client.send_raw(json.dumps({"type": "session.start", "sample_rate": 7000}))
            await expect("bad_audio")
            await client.send_raw(json.dumps({"type": "session.start", "channels": "two"}))
            await expect("bad_message")
            started = await client.start()
            assert started.model == "scripted" and started.sample_rate == 16000
            await client.send_raw(b"\x00\x00\x00")  # odd byte count
            await expect("bad_audio")
            await client.send_raw(json.dumps({"type": "text", "text": 5}))
            await expect("bad_message")
            await client.send_raw(json.dumps({"type": "text", "text": "x" * 5000}))
            await expect("bad_message")
            await client.send_raw(json.dumps({"type": "webrtc.offer", "sdp": "v=0"}))
            error = await client.wait_for(ErrorEvent, 10)
            # aiortc is installed (the webrtc extra): a bad SDP is refused
            assert error.code == "bad_message"
            assert error.message.startswith("invalid webrtc offer")
            await client.send_raw(json.dumps({"type": "session.start"}))
            await expect("bad_message")
            await client.send_raw(
                json.dumps({"type": "playback", "reply_id": "r1", "played_ms": 10})
            )
            await client.send_audio(bytes(640))  # whole samples are fine again
            await client.commit()
            await client.cancel()
            # the connection is still open and still works
            await client.send_text("still here")
            reply = await client.wait_for(ReplyDone, 20)
            assert reply.text == "echo still here"
            assert len(client.of_type(ErrorEvent)) == 12
            assert client.close_code is None

        # a frame over max_message_bytes closes that connection with 1009
        async with RealtimeClient(app.url) as big:
            await big.start()
            await big.send_audio(bytes(2**20))
            assert await big.wait_closed(20) == 1009
        assert len(replies) >= 1
    finally:
        stop.set()
        close_code = await asyncio.wait_for(other, 30)
    assert close_code is None or close_code == 1000
    assert replies == [f"echo turn {i + 1}" for i in range(len(replies))]


async def test_reconnect_with_session_id_resumes_the_conversation(config: Config) -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    async with running_server(config, engine) as app:
        async with RealtimeClient(app.url) as first:
            sid = (await first.start()).session_id
            await first.send_text("one")
            assert (await first.wait_for(ReplyDone, 20)).reply_id == "r1"
        async with asyncio.timeout(10):  # the server saw the disconnect
            while sid not in app.detached:
                await asyncio.sleep(0.01)
        async with RealtimeClient(app.url) as again:
            assert (await again.start(session_id=sid)).session_id == sid
            await again.send_text("two")
            done = await again.wait_for(ReplyDone, 20)
            assert (done.reply_id, done.text) == ("r2", "echo two")
        async with RealtimeClient(app.url) as stranger:
            other = (await stranger.start(session_id="no-such-session")).session_id
            assert other not in (sid, "no-such-session")
    conversations = [conversation for conversation, _ in engine.submitted]
    assert len(conversations) == 2 and conversations[0] is conversations[1]


async def test_session_limit_closes_with_1013(config: Config) -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    async with running_server(replace(config, max_sessions=2), engine) as app:
        async with RealtimeClient(app.url) as a, RealtimeClient(app.url) as b:
            await a.start()
            await b.start()
            async with RealtimeClient(app.url) as c:
                assert await c.wait_closed(20) == 1013
            await a.send_text("still served")
            assert (await a.wait_for(ReplyDone)).text == "echo still served"
        async with asyncio.timeout(10):  # the slots are free again
            while app.sessions:
                await asyncio.sleep(0.01)
        async with RealtimeClient(app.url) as d:
            assert (await d.start()).model == "scripted"


async def test_graceful_shutdown_closes_clients_with_1001(config: Config) -> None:
    engine = ScriptedEngine([" ".join(["long"] * 2000)], token_delay=0.01)
    stop = asyncio.Event()
    ready = asyncio.Event()
    app = WebSocketServerApp(config, engine)
    await app.start()
    task = asyncio.create_task(app.serve_forever(stop))
    ready.set()
    clients = [RealtimeClient(app.url) for _ in range(3)]
    try:
        for c in clients:
            await c.connect()
            await c.start()
            await c.send_text("talk for a while")
        for c in clients:
            await c.wait_for(ReplyDelta, 20)
        assert len(app.sessions) == 3
        stop.set()
        await asyncio.wait_for(task, 30)
        for c in clients:
            assert await c.wait_closed(20) == 1001
            assert not c.of_type(ReplyDone)
        assert not engine.started  # the engine was closed
        assert not engine._tasks  # no turn is left running
        assert not app.sessions
        with pytest.raises(OSError):  # no longer accepting
            await asyncio.open_connection("127.0.0.1", app.port)
    finally:
        for c in clients:
            await c.close()


async def test_serve_with_ready_and_stop(config: Config) -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    ready, stop = asyncio.Event(), asyncio.Event()
    # a fixed free port: serve() does not report it
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    task = asyncio.create_task(serve(replace(config, port=port), engine, ready=ready, stop=stop))
    await asyncio.wait_for(ready.wait(), 20)
    async with RealtimeClient(f"ws://127.0.0.1:{port}/v1/realtime") as client:
        await client.start()
        await client.send_text("hello")
        assert (await client.wait_for(ReplyDone)).text == "echo hello"
        stop.set()
        assert await client.wait_closed(20) == 1001
    await asyncio.wait_for(task, 20)
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
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SERVER_SCRIPT,
        str(port),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
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
            assert await client.wait_closed(20) == 1001
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    logs = [json.loads(line) for line in (await proc.stderr.read()).decode().splitlines()]
    messages = [rec["msg"] for rec in logs]
    assert any("serving http://127.0.0.1:" in m for m in messages)
    assert "server stopped" in messages
    started = [rec for rec in logs if rec["msg"] == "session started"]
    assert started and started[0]["session_id"] == sid
    assert all("w w w" not in line for line in messages)  # no reply text in logs
