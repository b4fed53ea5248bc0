"""The closing side of the sans-I/O server: close codes both ways, a peer
that never answers, keepalive pings, server shutdown, a failing handler."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK

from tests.helpers.waiting import until
from tests.transports.sansio.support import (
    WAIT,
    Handed,
    close_code,
    port_of,
    raw_frame,
    raw_open,
    running,
)
from voice_agent.transports.sansio import Connection


async def test_close_code_and_reason_reach_the_client() -> None:
    async def handler(connection: Connection) -> None:
        await connection.recv()
        await connection.close(4000, "bye now")

    async with running(handler) as (_, url), connect(url) as ws:
        await ws.send("go")
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 4000
        assert caught.value.rcvd.reason == "bye now"


async def test_a_client_close_makes_recv_raise() -> None:
    outcome: asyncio.Future[tuple[type[BaseException], int | None, str | None]] = (
        asyncio.get_running_loop().create_future()
    )

    async def handler(connection: Connection) -> None:
        try:
            await connection.recv()
        except ConnectionClosed as exc:
            outcome.set_result((type(exc), connection.close_code, connection.close_reason))

    async with running(handler) as (_, url):
        async with connect(url) as ws:
            await ws.close(1000, "leaving")
        kind, code, reason = await asyncio.wait_for(outcome, WAIT)
    assert kind is ConnectionClosedOK
    assert (code, reason) == (1000, "leaving")


async def test_send_after_close_raises_connection_closed() -> None:
    handed = Handed()
    async with running(handed) as (_, url), connect(url):
        connection = await handed.next()
        await asyncio.wait_for(connection.close(), WAIT)
        with pytest.raises(ConnectionClosedOK):
            await connection.send("too late")
        handed.release()


async def test_a_peer_that_never_answers_the_close_is_dropped() -> None:
    handed = Handed()
    async with running(handed, close_timeout=0.2) as (_, url):
        reader, writer = await raw_open(port_of(url))
        connection = await handed.next()
        closing = asyncio.create_task(connection.close(1000, "bye"))
        opcode, payload = await raw_frame(reader)
        assert (opcode, close_code(payload)) == (0x8, 1000)
        # The raw client never sends its close frame: the server drops the TCP.
        await asyncio.wait_for(closing, WAIT)
        with pytest.raises((ConnectionResetError, asyncio.IncompleteReadError)):
            await asyncio.wait_for(reader.readexactly(1), WAIT)
        assert connection.close_code == 1006  # no close frame came back
        writer.close()
        handed.release()


async def test_a_client_ping_is_answered() -> None:
    handed = Handed()
    async with running(handed, ping_interval=None) as (_, url), connect(url) as ws:
        await handed.next()
        pong = await ws.ping(b"are you there")
        latency = await asyncio.wait_for(pong, WAIT)
        assert latency >= 0
        handed.release()


async def test_keepalive_pings_are_sent_and_answers_measured() -> None:
    handed = Handed()
    async with running(handed, ping_interval=0.05, ping_timeout=WAIT) as (_, url), connect(url):
        connection = await handed.next()
        await until(lambda: connection.latency > 0)
        assert connection.state.name == "OPEN"
        handed.release()


async def test_a_peer_that_never_answers_pings_is_closed_with_1011() -> None:
    handed = Handed()
    async with running(handed, ping_interval=0.05, ping_timeout=0.05) as (_, url):
        reader, writer = await raw_open(port_of(url))
        connection = await handed.next()
        for _ in range(10):  # pings first, then the close frame
            opcode, payload = await raw_frame(reader)
            if opcode == 0x8:
                break
            assert opcode == 0x9
        assert (opcode, close_code(payload)) == (0x8, 1011)
        # Failing the connection, the server half-closed at once (no waiting
        # for a close frame back): the client sees EOF and closes its side.
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
        await asyncio.wait_for(connection.wait_closed(), WAIT)
        handed.release()


async def test_server_close_closes_open_connections_with_1001() -> None:
    ended: list[str] = []

    async def handler(connection: Connection) -> None:
        try:
            async for _ in connection:
                pass
        finally:
            ended.append(type(connection).__name__)

    async with running(handler) as (server, url):
        clients = [await connect(url) for _ in range(3)]
        await until(lambda: len(server.connections) == 3)
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)
        assert ended == ["Connection"] * 3
        assert not server.connections
        for ws in clients:
            with pytest.raises(ConnectionClosedOK) as caught:
                await asyncio.wait_for(ws.recv(), WAIT)
            assert caught.value.rcvd is not None
            assert caught.value.rcvd.code == 1001
        assert not server.is_serving()


async def test_a_handler_that_raises_closes_with_1011() -> None:
    async def handler(connection: Connection) -> None:
        await connection.recv()
        raise RuntimeError("handler bug")

    async with running(handler) as (_, url), connect(url) as ws:
        await ws.send("boom")
        with pytest.raises(ConnectionClosedError) as caught:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 1011


async def test_a_handler_that_returns_closes_with_1000() -> None:
    async def handler(connection: Connection) -> None:
        await connection.send("hello and goodbye")

    async with running(handler) as (_, url), connect(url) as ws:
        assert await asyncio.wait_for(ws.recv(), WAIT) == "hello and goodbye"
        with pytest.raises(ConnectionClosedOK):
            await asyncio.wait_for(ws.recv(), WAIT)
        assert ws.close_code == 1000


async def test_stop_accepting_first_then_close_the_connections() -> None:
    handed = Handed()
    async with running(handed) as (server, url), connect(url) as ws:
        connection = await handed.next()
        server.close(close_connections=False)  # stop accepting only
        assert not server.is_serving()
        with pytest.raises(OSError):
            await connect(url, open_timeout=WAIT)
        await connection.send("still here")
        assert await asyncio.wait_for(ws.recv(), WAIT) == "still here"
        server.close(code=1012, reason="restart")
        await asyncio.wait_for(server.wait_closed(), WAIT)
        with pytest.raises(ConnectionClosed) as caught:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert caught.value.rcvd is not None
        assert (caught.value.rcvd.code, caught.value.rcvd.reason) == (1012, "restart")
