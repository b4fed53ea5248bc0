"""The opening side of the sans-I/O server: process_request answering plain
HTTP, subprotocol selection, failing hooks, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Sequence
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Request, Response

from tests.helpers.tls import make_tls_files
from tests.helpers.waiting import until
from tests.transports.sansio.support import WAIT, Handed, port_of, running
from voice_agent.transports.sansio import Connection


def not_found() -> Response:
    body = b"not found\n"
    headers = Headers(
        [
            ("Content-Type", "text/plain"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(404, "Not Found", headers, body)


def routes(connection: Connection, request: Request) -> Response | None:
    assert connection.request is request
    return None if request.path == "/ws" else not_found()


async def slow_routes(connection: Connection, request: Request) -> Response | None:
    await asyncio.sleep(0)
    return routes(connection, request)


async def http_get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    try:
        return await asyncio.wait_for(reader.read(), WAIT)  # until the server closes
    finally:
        writer.close()


@pytest.mark.parametrize("process_request", [routes, slow_routes])
async def test_a_response_from_process_request_is_plain_http(process_request: object) -> None:
    handed = Handed()
    async with running(handed, process_request=process_request) as (_, url):
        answer = await http_get(port_of(url), "/index.html")
        assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n")
        assert answer.endswith(b"\r\n\r\nnot found\n")
        with pytest.raises(InvalidStatus) as caught:
            async with connect(url + "/elsewhere"):
                pass
        assert caught.value.response.status_code == 404
        assert handed.connections.empty()  # no handshake, no handler
        async with connect(url + "/ws") as ws:
            connection = await handed.next()
            assert connection.request is not None
            assert connection.request.path == "/ws"
            assert connection.request.headers["Host"] == f"127.0.0.1:{port_of(url)}"
            assert connection.remote_address[0] == "127.0.0.1"
            assert ws.state.name == "OPEN"
            handed.release()


async def test_process_request_that_raises_answers_500() -> None:
    def broken(connection: Connection, request: Request) -> Response | None:
        raise RuntimeError("route failed")

    async with running(Handed(), process_request=broken) as (_, url):
        answer = await http_get(port_of(url), "/")
        assert answer.startswith(b"HTTP/1.1 500 ")
        assert b"route failed" not in answer


async def test_a_plain_get_without_upgrade_is_refused() -> None:
    async with running(Handed()) as (_, url):
        answer = await http_get(port_of(url), "/")
        assert answer.startswith(b"HTTP/1.1 426 ")


async def test_select_subprotocol_is_honoured() -> None:
    offers: list[list[str]] = []

    def select(connection: Connection, offered: Sequence[str]) -> str | None:
        offers.append(list(offered))
        return "voice.v2" if "voice.v2" in offered else None

    handed = Handed()
    async with running(handed, select_subprotocol=select) as (_, url):
        async with connect(url, subprotocols=["voice.v1", "voice.v2"]) as ws:  # type: ignore[list-item]
            connection = await handed.next()
            assert ws.subprotocol == "voice.v2"
            assert connection.subprotocol == "voice.v2"
            handed.release()
        async with connect(url) as ws:
            connection = await handed.next()
            assert ws.subprotocol is None
            assert connection.subprotocol is None
    assert offers == [["voice.v1", "voice.v2"], []]


async def test_tls(tmp_path: Path) -> None:
    ca, cert, key = make_tls_files(tmp_path)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(ca))

    async def echo(connection: Connection) -> None:
        async for message in connection:
            await connection.send(message)

    async with running(echo, ssl=server_context) as (_, url):
        assert url.startswith("wss://")
        async with connect(url, ssl=client_context) as ws:
            await ws.send("over tls")
            assert await asyncio.wait_for(ws.recv(), WAIT) == "over tls"
            await ws.send(b"\x00" * 100_000)
            assert await asyncio.wait_for(ws.recv(), WAIT) == b"\x00" * 100_000
            await ws.close(1000, "done")
        assert ws.close_code == 1000


async def test_a_connection_that_never_sends_a_request_is_dropped() -> None:
    handed = Handed()
    async with running(handed, open_timeout=0.2) as (server, url):
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        try:
            # Nothing sent: after open_timeout the server drops the TCP.
            with contextlib.suppress(ConnectionResetError):
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
            await until(lambda: not server.connections)
        finally:
            writer.close()
        assert handed.connections.empty()
