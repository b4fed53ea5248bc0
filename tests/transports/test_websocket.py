"""The WebSocket transport on a real server on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import (
    ErrorEvent,
    ReplyCancelled,
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

from .servers import free_port, json_logs, server_process
from .tls_files import make_tls_files

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


async def scrape(port: int) -> dict[str, float]:
    """GET /metrics, parsed: {sample name with its labels: value}."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = await http_get(port, "/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


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
        status, headers, _ = await http_get(app.port, "/metrics")
        metrics = await scrape(app.port)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert metrics["voice_agent_sessions_active"] == 1
    assert metrics["voice_agent_sessions_total"] == 1
    assert metrics["voice_agent_turns_total"] == 1
    assert {"voice_agent_utterances_total", "voice_agent_barge_ins_total"} <= set(metrics)
    assert metrics['voice_agent_errors_total{code="busy"}'] == 0


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
    app = WebSocketServerApp(replace(config, drain_timeout=0), engine)
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
            # no time to drain: the reply was cancelled, and the client was told
            assert [e.reason for e in c.of_type(ReplyCancelled)] == ["client"]
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
    port = free_port()  # a fixed free port: serve() does not report it
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
            assert await client.wait_closed(20) == 1001
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    logs = await json_logs(proc)
    messages = [rec["msg"] for rec in logs]
    assert any("serving http://127.0.0.1:" in m for m in messages)
    assert "server stopped" in messages
    started = [rec for rec in logs if rec["msg"] == "session started"]
    assert started and started[0]["session_id"] == sid
    assert all("w w w" not in line for line in messages)  # no reply text in logs


# -- access: tokens, origins, TLS ---------------------------------------------


async def _closed_with(url: str, first: dict[str, object] | bytes, **connect: object) -> int | None:
    """Open a connection, send one message, return the close code the server chose."""
    async with ws_connect(url, **connect) as ws:  # type: ignore[arg-type]
        with contextlib.suppress(ConnectionClosed):  # it may be closed already
            await ws.send(first if isinstance(first, bytes) else json.dumps(first))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(20):
                while True:
                    await ws.recv()
        return ws.close_code


async def test_token_is_required_in_session_start(config: Config, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# speakers\nkitchen-secret\n\nliving-room-secret  # second one\n")
    cfg = replace(config, token="main-secret", tokens_file=str(tokens))
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        start = {"type": "session.start"}
        assert await _closed_with(app.url, start) == 1008  # no token
        assert await _closed_with(app.url, {**start, "token": "wrong"}) == 1008
        assert await _closed_with(app.url, {**start, "token": "main-secre"}) == 1008  # a prefix
        assert await _closed_with(app.url, {**start, "token": ""}) == 1008
        # nothing is accepted before an authenticated session.start
        assert await _closed_with(app.url, bytes(640)) == 1008
        assert await _closed_with(app.url, {"type": "text", "text": "hi"}) == 1008
        # a token in the URL is not a token
        assert await _closed_with(app.url + "?token=main-secret", start) == 1008
        sids = {}
        for token in ("main-secret", "kitchen-secret", "living-room-secret"):
            async with RealtimeClient(app.url) as client:
                sids[token] = (await client.start(token=token)).session_id
                await client.send_text("hello")
                assert (await client.wait_for(ReplyDone, 20)).text == "echo hello"
                assert client.close_code is None
        async with asyncio.timeout(10):
            while len(app.detached) < 3:
                await asyncio.sleep(0.01)
        # a conversation resumes only with the token that opened it
        async with RealtimeClient(app.url) as thief:
            started = await thief.start(token="kitchen-secret", session_id=sids["main-secret"])
            assert started.session_id != sids["main-secret"]
        async with RealtimeClient(app.url) as owner:
            started = await owner.start(token="main-secret", session_id=sids["main-secret"])
            assert started.session_id == sids["main-secret"]
        _status, _, body = await http_get(app.port, "/metrics")
        assert (await scrape(app.port))["voice_agent_auth_failures_total"] == 7
        assert b"main-secret" not in body


def test_check_token_compares_every_token_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hmac

    from voice_agent.errors import PolicyViolation
    from voice_agent.transports import websocket

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(websocket.hmac, "compare_digest", counting)
    tokens = ("first", "second", "third")
    owner = websocket.check_token("first", tokens)
    assert len(calls) == 3  # no early exit on the first match
    assert owner and owner == websocket.check_token("first", tokens)
    assert owner != websocket.check_token("third", tokens)
    assert "first" not in owner
    for bad in (None, "", "firs", "first ", "FIRST"):
        with pytest.raises(PolicyViolation):
            websocket.check_token(bad, tokens)
    assert websocket.check_token(None, ()) == ""  # no tokens configured: open


def test_load_tokens(tmp_path: Path) -> None:
    from voice_agent.errors import ConfigError
    from voice_agent.transports.websocket import load_tokens

    path = tmp_path / "tokens"
    path.write_text("a # comment\n\n# only a comment\nb\n")
    assert load_tokens(Config(token="x", tokens_file=str(path))) == ("x", "a", "b")
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError):
        load_tokens(Config(tokens_file=str(path)))
    with pytest.raises(ConfigError):
        load_tokens(Config(tokens_file=str(tmp_path / "missing")))


def test_origin_rules() -> None:
    from voice_agent.transports.websocket import origin_allowed

    def ok(origin: str | None, host: str | None, allowed: tuple[str, ...] = ()) -> bool:
        return origin_allowed(origin, host, scheme="http", allowed=allowed, server_host="0.0.0.0")

    assert ok(None, "127.0.0.1:8765")  # not a browser
    assert ok("http://127.0.0.1:8765", "127.0.0.1:8765")  # the server's own page
    assert ok("http://localhost:8765", "localhost:8765")
    assert ok("http://[::1]:8765", "[::1]:8765")
    assert ok("http://192.168.1.5:8765", "192.168.1.5:8765")
    assert not ok("http://evil.example", "127.0.0.1:8765")
    assert not ok("https://127.0.0.1:8765", "127.0.0.1:8765")  # another scheme
    assert not ok("http://127.0.0.1:9999", "127.0.0.1:8765")  # another port
    assert not ok("null", "127.0.0.1:8765")
    # DNS rebinding: a page of evil.example resolved to this server; Host matches Origin
    assert not ok("http://evil.example:8765", "evil.example:8765")
    # ... unless the operator named that host
    assert ok("http://voice.lan:8765", "voice.lan:8765", ("http://voice.lan:8765",))
    assert ok("https://app.example", "127.0.0.1:8765", ("https://app.example",))
    assert not ok("https://app.example.evil", "127.0.0.1:8765", ("https://app.example",))


async def test_origin_allowlist_at_the_handshake(config: Config) -> None:
    cfg = replace(config, allowed_origins=("https://home.example",))
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        start = {"type": "session.start"}
        assert await _closed_with(app.url, start, origin="http://evil.example") == 1008
        assert await _closed_with(app.url, start, origin="https://home.example.evil") == 1008
        for origin in (None, "https://home.example", f"http://127.0.0.1:{app.port}"):
            async with ws_connect(app.url, origin=origin) as ws:  # type: ignore[arg-type]
                await ws.send(json.dumps(start))
                event = json.loads(await asyncio.wait_for(ws.recv(), 20))
                assert event["type"] == "session.started"
        assert (await scrape(app.port))["voice_agent_origin_refused_total"] == 2


async def test_tls_serves_https_and_wss(config: Config, tmp_path: Path) -> None:
    import ssl

    ca, cert, key = make_tls_files(tmp_path)
    cfg = replace(config, tls_cert=str(cert), tls_key=str(key), token="t0k")
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        assert app.url.startswith("wss://127.0.0.1:") and app.http_url.startswith("https://")
        context = ssl.create_default_context(cafile=str(ca))
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port, ssl=context)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), 20)
        writer.close()
        assert response.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in response
        async with ws_connect(app.url, ssl=context, origin=f"https://127.0.0.1:{app.port}") as ws:
            await ws.send(json.dumps({"type": "session.start", "token": "t0k"}))
            assert json.loads(await ws.recv())["type"] == "session.started"
            await ws.send(json.dumps({"type": "text", "text": "over tls"}))
            async with asyncio.timeout(20):
                while (event := json.loads(await ws.recv()))["type"] != "reply.done":
                    pass
            assert event["text"] == "echo over tls"
        # plain text on the TLS port gets nowhere
        with pytest.raises((OSError, InvalidHandshake, TimeoutError)):
            async with ws_connect(app.url.replace("wss://", "ws://"), open_timeout=5):
                pass


async def test_bad_tls_files_fail_before_listening(config: Config, tmp_path: Path) -> None:
    from voice_agent.errors import ConfigError

    (tmp_path / "c.pem").write_text("not a certificate")
    cfg = replace(config, tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "c.pem"))
    with pytest.raises(ConfigError):
        async with running_server(cfg, ScriptedEngine(echo)):
            pass


async def test_non_loopback_without_token_warns(
    config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("WARNING", logger="voice_agent.transports.websocket")
    async with running_server(replace(config, host="0.0.0.0"), ScriptedEngine(echo)):
        pass
    assert any("without a token" in r.getMessage() for r in caplog.records)
    caplog.clear()
    async with running_server(replace(config, host="0.0.0.0", token="x"), ScriptedEngine(echo)):
        pass
    async with running_server(config, ScriptedEngine(echo)):  # loopback: no warning
        pass
    assert not any("without a token" in r.getMessage() for r in caplog.records)


# -- limits ---------------------------------------------------------------------


async def test_connections_per_client_address(config: Config) -> None:
    cfg = replace(config, max_connections_per_client=2)
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        async with RealtimeClient(app.url) as a, RealtimeClient(app.url) as b:
            await a.start()
            await b.start()
            async with RealtimeClient(app.url) as c:
                assert await c.wait_closed(20) == 1013
            await a.send_text("still served")
            assert (await a.wait_for(ReplyDone, 20)).text == "echo still served"
        async with asyncio.timeout(10):
            while app._per_client:
                await asyncio.sleep(0.01)
        async with RealtimeClient(app.url) as d:
            assert (await d.start()).model == "scripted"


async def test_idle_session_is_closed_but_not_while_a_reply_runs(config: Config) -> None:
    cfg = replace(config, idle_timeout=0.3)
    engine = ScriptedEngine([" ".join(["w"] * 100)], token_delay=0.01)  # about 1 s
    async with running_server(cfg, engine) as app:
        async with RealtimeClient(app.url) as client:
            await client.start()
            await client.send_text("a long answer please")
            done = await client.wait_for(ReplyDone, 20)  # not closed while it ran
            assert done.text.count("w") == 100
            assert await client.wait_closed(20) == 1000
        assert (await scrape(app.port))["voice_agent_idle_closes_total"] == 1


def test_token_bucket_limits_with_a_fake_clock() -> None:
    from voice_agent.limits import AudioPacer, MessageLimiter

    now = [0.0]
    limiter = MessageLimiter(10.0, lambda: now[0])
    waits = [limiter.message() for _ in range(15)]
    assert waits[:10] == [0.0] * 10  # a burst of one second's worth
    assert waits[10:] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    now[0] += 0.5  # the reader waited as told
    assert limiter.message() == pytest.approx(0.1)
    now[0] += 10.0
    assert limiter.message() == 0.0  # refilled, but not beyond the burst
    assert limiter.level == pytest.approx(9.0)

    pacer = AudioPacer(2.0, lambda: now[0], burst_s=4.0)
    assert pacer.audio(4.0) == 0.0  # the allowance
    assert pacer.audio(2.0) == pytest.approx(1.0)  # 2 s of audio at 2x: 1 s
    now[0] += 1.0
    assert pacer.audio(0.02) == pytest.approx(0.01)
    # real time (1x) never waits once the allowance is spent
    steady = AudioPacer(1.5, lambda: now[0], burst_s=1.0)
    for _ in range(500):
        assert steady.audio(0.02) == 0.0
        now[0] += 0.02
    assert pacer.throttled_s == pytest.approx(1.01)


async def test_audio_faster_than_real_time_is_throttled(config: Config) -> None:
    cfg = replace(config, max_audio_speed=8.0)
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        async with RealtimeClient(app.url) as client:
            await client.start()
            frame = bytes(16000)  # 0.5 s of silence
            for _ in range(30):  # 15 s sent as fast as the socket takes it
                await client.send_audio(frame)
            await client.send_text("after the flood")
            assert (await client.wait_for(ReplyDone, 30)).text == "echo after the flood"
            assert client.close_code is None
        # 15 s at 8x after a 10 s allowance
        assert (await scrape(app.port))["voice_agent_throttled_seconds_total"] > 0.0


async def test_client_that_never_reads_is_closed_and_others_are_unaffected(
    config: Config,
) -> None:
    import secrets
    import socket

    # random text: permessage-deflate cannot shrink it
    flood = "".join(" " + secrets.token_urlsafe(3000) for _ in range(4000))
    engine = ScriptedEngine(
        lambda turn: flood if turn.text == "flood" else f"echo {turn.text}",
        token_delay=0.0,
    )
    cfg = replace(config, send_queue=32, max_new_tokens=4000)
    async with running_server(cfg, engine) as app:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", app.port))
        sock.setblocking(False)
        # max_queue=1: the client library stops reading after one message
        async with ws_connect(app.url, sock=sock, max_queue=1) as lazy:
            await lazy.send(json.dumps({"type": "session.start"}))
            await lazy.send(json.dumps({"type": "text", "text": "flood"}))
            async with RealtimeClient(app.url) as good:
                await good.start()
                async with asyncio.timeout(60):
                    while app.limit_counters["slow_consumer_closes_total"] < 1:
                        await good.send_text("ping")
                        assert (await good.wait_for(ReplyDone, 20)).text == "echo ping"
                        # the server never holds more than the queue for it
                        for conn in app._live_connections:
                            assert conn._out.qsize() <= 32
                async with asyncio.timeout(30):  # the slow one is gone
                    while len(app.sessions) > 1:
                        await asyncio.sleep(0.05)
                await good.send_text("after")
                assert (await good.wait_for(ReplyDone, 20)).text == "echo after"
                assert not good.of_type(ErrorEvent) and good.close_code is None
            lazy.transport.abort()  # its close handshake would wait on its own full buffer
        async with asyncio.timeout(10):  # its generation was cancelled, not run to the end
            while engine._tasks:
                await asyncio.sleep(0.01)
        flood_conversation = next(c for c, t in engine.submitted if t.text == "flood")
        history = engine.history_text(flood_conversation)
        assert 0 < len(history) < len(flood) // 2


# -- faults ---------------------------------------------------------------------


async def test_a_failing_turn_fails_only_its_session(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def reply(turn: TurnInput) -> str:
        if turn.text == "boom":
            raise RuntimeError("secret model detail")
        return f"echo {turn.text}"

    async with running_server(config, ScriptedEngine(reply, token_delay=0.002)) as app:
        stop = asyncio.Event()
        replies: list[str] = []
        other = asyncio.create_task(_keep_talking(app.url, stop, replies))
        try:
            async with RealtimeClient(app.url) as client:
                await client.start()
                await client.send_text("boom")
                error = await client.wait_for(ErrorEvent, 20)
                assert error.code == "internal" and "secret" not in error.message
                await client.send_text("fine")
                assert (await client.wait_for(ReplyDone, 20)).text == "echo fine"
                # a bug while handling a message: `internal`, no exception text
                live = next(
                    iter(
                        s
                        for s in app.sessions.values()
                        if s.session_id == client.session.session_id
                    )
                )  # type: ignore[union-attr]

                async def broken(text: str) -> None:
                    raise RuntimeError("secret handler detail")

                monkeypatch.setattr(live, "text", broken)
                await client.send_text("again")
                error = await client.wait_for(ErrorEvent, 20)
                assert (error.code, error.message) == ("internal", "internal server error")
                await client.send_audio(bytes(640))  # the connection goes on
                assert client.close_code is None
        finally:
            stop.set()
            assert await asyncio.wait_for(other, 30) in (None, 1000)
        assert replies == [f"echo turn {i + 1}" for i in range(len(replies))]


async def test_client_leaving_mid_reply_cancels_its_generation(config: Config) -> None:
    engine = ScriptedEngine([" ".join(["w"] * 5000)], token_delay=0.01)  # 50 s if not stopped
    cfg = replace(config, max_new_tokens=5000)
    async with running_server(cfg, engine) as app:
        client = RealtimeClient(app.url)
        await client.connect()
        await client.start()
        await client.send_text("talk")
        await client.wait_for(ReplyDelta, 20)
        client.ws.transport.abort()  # gone without a close handshake
        async with asyncio.timeout(10):
            while engine._tasks or app.sessions:
                await asyncio.sleep(0.01)
        conversation = engine.submitted[0][0]
        assert 0 < engine.history_text(conversation).count("w") < 1000  # not all 5000
        await client.close()


def _server_connections(app: WebSocketServerApp) -> list[object]:
    return [conn.ws for conn in app._live_connections]


async def test_audio_frames_take_the_fast_path_and_keep_their_order(
    app: WebSocketServerApp, audio_dir: Path
) -> None:
    """Binary frames that arrive while the handler waits are fed at once by the
    protocol (no queue or task switch); the session's events and the text
    that follows the audio come out as on the normal path."""
    from voice_agent.client import load_pcm, send_paced
    from voice_agent.protocol import SpeechStartedEvent, SpeechStoppedEvent
    from voice_agent.transports.websocket import _FastConnection

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
        (ws,) = _server_connections(app)
        assert isinstance(ws, _FastConnection)
        # most of the ~250 frames went the fast way (some race the handler)
        assert ws.fast_frames > 100


async def test_a_frame_that_fails_on_the_fast_path_gets_internal_and_the_session_lives(
    app: WebSocketServerApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voice_agent.session import Session

    original = Session.feed_audio

    def feed(self: Session, pcm: bytes) -> object:
        if len(pcm) == 642:
            raise RuntimeError("boom")
        return original(self, pcm)

    monkeypatch.setattr(Session, "feed_audio", feed)
    async with RealtimeClient(app.url) as client:
        await client.start()
        for _ in range(10):
            await client.send_audio(bytes(640))
            await asyncio.sleep(0.005)
        await client.send_audio(bytes(642))
        error = await client.wait_for(ErrorEvent, 10)
        assert error.code == "internal"
        await client.send_audio(bytes(640))
        await client.send_text("still here")
        assert (await client.wait_for(ReplyDone, 20)).text == "echo still here"
        assert client.close_code is None
        (ws,) = _server_connections(app)
        # the ten frames and the failing one (the handler was idle for each)
        assert ws.fast_frames >= 11  # type: ignore[attr-defined]
