"""Shared by the WebSocket transport tests (test_websocket_*.py): a real
server on a free loopback port with a scripted engine, a web directory with
a few files (and things that must never be served), raw HTTP and /metrics
readers, and clients that keep talking or expect a close."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import ErrorEvent, ReplyDone
from voice_agent.transports.websocket import WebSocketServerApp, running_server

WAIT = 20.0  # generous: these machines have 2 cores


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
    data = await asyncio.wait_for(reader.read(), WAIT)
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

    status, headers, body = await http_get(port, "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def keep_talking(url: str, stop: asyncio.Event, done: list[str]) -> int | None:
    """A well-behaved client: text turns back to back until `stop`; every
    reply must arrive, and nothing else may go wrong."""
    async with RealtimeClient(url) as client:
        await client.start()
        n = 0
        while not stop.is_set() or n < 3:
            n += 1
            await client.send_text(f"turn {n}")
            reply = await client.wait_for(ReplyDone, WAIT)
            done.append(reply.text)
        assert not client.of_type(ErrorEvent)
        return client.close_code


async def closed_with(url: str, first: dict[str, object] | bytes, **connect: object) -> int | None:
    """Open a connection, send one message, return the close code the server chose."""
    code, _ = await close_of(url, first, **connect)
    return code


async def close_of(
    url: str, first: dict[str, object] | bytes | None = None, **connect: object
) -> tuple[int | None, str | None]:
    """Open a connection, send one message (None: nothing), return the close
    code and reason the server chose."""
    async with ws_connect(url, **connect) as ws:  # type: ignore[arg-type]
        if first is not None:
            with contextlib.suppress(ConnectionClosed):  # it may be closed already
                await ws.send(first if isinstance(first, bytes) else json.dumps(first))
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(WAIT):
                while True:
                    await ws.recv()
        return ws.close_code, ws.close_reason
