"""Access to the WebSocket transport: tokens, the handshake's Origin, TLS."""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import replace
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidHandshake

from tests.helpers.tls import make_tls_files
from tests.helpers.waiting import until
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import ConfigError, PolicyViolation
from voice_agent.protocol import ReplyDone
from voice_agent.transports.websocket import (
    check_token,
    load_tokens,
    origin_allowed,
    running_server,
)

from . import ws_support
from .ws_support import WAIT, closed_with, echo, http_get, scrape

pytestmark = pytest.mark.timeout(60)

# the fixtures of ws_support that the tests below use
web_dir = ws_support.web_dir
config = ws_support.config


async def test_token_is_required_in_session_start(config: Config, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# speakers\nkitchen-secret\n\nliving-room-secret  # second one\n")
    cfg = replace(config, token="main-secret", tokens_file=str(tokens))
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        start = {"type": "session.start"}
        assert await closed_with(app.url, start) == 1008  # no token
        assert await closed_with(app.url, {**start, "token": "wrong"}) == 1008
        assert await closed_with(app.url, {**start, "token": "main-secre"}) == 1008  # a prefix
        assert await closed_with(app.url, {**start, "token": ""}) == 1008
        # nothing is accepted before an authenticated session.start
        assert await closed_with(app.url, bytes(640)) == 1008
        assert await closed_with(app.url, {"type": "text", "text": "hi"}) == 1008
        # a token in the URL is not a token
        assert await closed_with(app.url + "?token=main-secret", start) == 1008
        sids = {}
        for token in ("main-secret", "kitchen-secret", "living-room-secret"):
            async with RealtimeClient(app.url) as client:
                sids[token] = (await client.start(token=token)).session_id
                await client.send_text("hello")
                assert (await client.wait_for(ReplyDone, WAIT)).text == "echo hello"
                assert client.close_code is None
        kept = app.host.conversations.kept
        await until(lambda: len(kept) >= 3)
        # a conversation resumes only with the token that opened it
        async with RealtimeClient(app.url) as thief:
            started = await thief.start(token="kitchen-secret", session_id=sids["main-secret"])
            assert started.session_id != sids["main-secret"]
        async with RealtimeClient(app.url) as owner:
            started = await owner.start(token="main-secret", session_id=sids["main-secret"])
            assert started.session_id == sids["main-secret"]
        _status, _, body = await http_get(app.port, "/metrics")
        metrics = await scrape(app.port)
        assert metrics["voice_agent_auth_failures_total"] == 7
        key = 'voice_agent_transport_errors_total{code="policy",transport="realtime"}'
        assert metrics[key] == 7
        assert b"main-secret" not in body


def test_check_token_compares_every_token_in_constant_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hmac

    from voice_agent.transports.websocket import access

    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    tokens = ("first", "second", "third")
    owner = check_token("first", tokens)
    assert len(calls) == 3  # no early exit on the first match
    assert owner and owner == check_token("first", tokens)
    assert owner != check_token("third", tokens)
    assert "first" not in owner
    for bad in (None, "", "firs", "first ", "FIRST"):
        with pytest.raises(PolicyViolation):
            check_token(bad, tokens)
    assert check_token(None, ()) == ""  # no tokens configured: open


def test_load_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("a # comment\n\n# only a comment\nb\n")
    assert load_tokens(Config(token="x", tokens_file=str(path))) == ("x", "a", "b")
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError):
        load_tokens(Config(tokens_file=str(path)))
    with pytest.raises(ConfigError):
        load_tokens(Config(tokens_file=str(tmp_path / "missing")))


def test_origin_rules() -> None:
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
        assert await closed_with(app.url, start, origin="http://evil.example") == 1008
        assert await closed_with(app.url, start, origin="https://home.example.evil") == 1008
        for origin in (None, "https://home.example", f"http://127.0.0.1:{app.port}"):
            async with ws_connect(app.url, origin=origin) as ws:  # type: ignore[arg-type]
                await ws.send(json.dumps(start))
                event = json.loads(await asyncio.wait_for(ws.recv(), WAIT))
                assert event["type"] == "session.started"
        assert (await scrape(app.port))["voice_agent_origin_refused_total"] == 2
        await until(lambda: app.host.admission.open == 0)  # refusals took no place


async def test_tls_serves_https_and_wss(config: Config, tmp_path: Path) -> None:
    ca, cert, key = make_tls_files(tmp_path)
    cfg = replace(config, tls_cert=str(cert), tls_key=str(key), token="t0k")
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        assert app.url.startswith("wss://127.0.0.1:") and app.http_url.startswith("https://")
        context = ssl.create_default_context(cafile=str(ca))
        reader, writer = await asyncio.open_connection("127.0.0.1", app.port, ssl=context)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        response = await asyncio.wait_for(reader.read(), WAIT)
        writer.close()
        assert response.startswith(b"HTTP/1.1 200") and b'"status": "ok"' in response
        async with ws_connect(app.url, ssl=context, origin=f"https://127.0.0.1:{app.port}") as ws:
            await ws.send(json.dumps({"type": "session.start", "token": "t0k"}))
            assert json.loads(await ws.recv())["type"] == "session.started"
            await ws.send(json.dumps({"type": "text", "text": "over tls"}))
            async with asyncio.timeout(WAIT):
                while (event := json.loads(await ws.recv()))["type"] != "reply.done":
                    pass
            assert event["text"] == "echo over tls"
        # plain text on the TLS port gets nowhere
        with pytest.raises((OSError, InvalidHandshake, TimeoutError)):
            async with ws_connect(app.url.replace("wss://", "ws://"), open_timeout=5):
                pass


async def test_bad_tls_files_fail_before_listening(config: Config, tmp_path: Path) -> None:
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
