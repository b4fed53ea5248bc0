"""benchmarks/soak_clients.py close_cause: who ended a connection, told apart
by the close frames (a client sees 1006 both when the server drops it and
when its own keepalive gives up), against a real websockets server."""

from __future__ import annotations

import asyncio

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from benchmarks.soak_clients import close_cause


async def _cause(server_does: str, client_does: str = "") -> tuple[str, int | None]:
    async def handler(ws: ServerConnection) -> None:
        if server_does == "close":
            await ws.close(1011, "keepalive ping timeout")
        elif server_does == "drop":
            ws.transport.abort()
        else:
            await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        ws = await connect(f"ws://127.0.0.1:{port}", open_timeout=5)
        if client_does == "close":
            await ws.close(1011, "keepalive ping timeout")
        await asyncio.wait_for(ws.wait_closed(), 5)
        return close_cause(ws), ws.close_code


async def test_a_close_frame_from_the_server_is_the_servers() -> None:
    cause, code = await _cause("close")
    assert cause == "server closed 1011 keepalive ping timeout" and code == 1011


async def test_a_dropped_connection_has_no_close_frame() -> None:
    cause, code = await _cause("drop")
    assert cause == "connection dropped without a close frame" and code == 1006


async def test_our_own_close_is_ours() -> None:
    cause, _ = await _cause("wait", client_does="close")
    assert cause == "client closed 1011 keepalive ping timeout"
