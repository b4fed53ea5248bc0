"""Helpers for the sans-I/O server tests: a running server on a free loopback
port, a handler that hands its connection to the test, and a raw client that
speaks just enough WebSocket to misbehave (never answer a close or a ping)."""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from voice_agent.transports.sansio import Connection, Server, serve

WAIT = 30.0  # generous bound for anything awaited (2-core machines)


@asynccontextmanager
async def running(
    handler: Callable[[Connection], Awaitable[None]], **options: Any
) -> AsyncIterator[tuple[Server, str]]:
    """serve(handler) on 127.0.0.1 and a free port: (server, "ws://127.0.0.1:PORT")."""
    server = await serve(handler, "127.0.0.1", 0, **options)
    port = server.sockets[0].getsockname()[1]
    scheme = "wss" if options.get("ssl") is not None else "ws"
    try:
        yield server, f"{scheme}://127.0.0.1:{port}"
    finally:
        server.close()
        await asyncio.wait_for(server.wait_closed(), WAIT)


class Handed:
    """A handler that hands each connection to the test and stays in it
    until the test says `release()` (or the connection closes)."""

    def __init__(self) -> None:
        self.connections: asyncio.Queue[Connection] = asyncio.Queue()
        self.released = asyncio.Event()

    async def __call__(self, connection: Connection) -> None:
        await self.connections.put(connection)
        waiters = [
            asyncio.ensure_future(self.released.wait()),
            asyncio.ensure_future(connection.wait_closed()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def next(self) -> Connection:
        return await asyncio.wait_for(self.connections.get(), WAIT)

    def release(self) -> None:
        self.released.set()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def raw_open(port: int, path: str = "/") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection that has done the WebSocket handshake by hand."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


async def raw_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One frame from the server (unmasked): (opcode, payload)."""
    first, second = await asyncio.wait_for(reader.readexactly(2), WAIT)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A client frame, masked with a zero key (so the payload reads as is)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    if len(payload) < 126:
        head += bytes([0x80 | len(payload)])
    else:
        head += bytes([0x80 | 126]) + struct.pack("!H", len(payload))
    return head + b"\x00\x00\x00\x00" + payload


def close_code(payload: bytes) -> int:
    return int(struct.unpack("!H", payload[:2])[0])
