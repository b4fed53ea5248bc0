"""serve() and Server: the listening side of the sans-I/O WebSocket server."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl as ssl_module
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any

from websockets.frames import CloseCode
from websockets.protocol import State

from voice_agent.transports.sansio.connection import Connection
from voice_agent.transports.sansio.settings import (
    LOGGER_NAME,
    Handler,
    ProcessRequest,
    SelectSubprotocol,
    Settings,
)


class Server:
    """A listening server. `server` is the asyncio.Server (closing it only
    stops accepting); `connections` the connections whose TCP is open."""

    server: asyncio.Server

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.logger = settings.logger
        self.connections: set[Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self._closing = False
        self._closing_connections = False
        self._tasks: set[asyncio.Task[None]] = set()  # connections being closed
        self._close_task: asyncio.Task[None] | None = None
        self._closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self.server.sockets)

    @property
    def closing(self) -> bool:
        """close() was called: new handshakes are refused with 503."""
        return self._closing

    def is_serving(self) -> bool:
        return self.server.is_serving()

    def close(
        self, close_connections: bool = True, code: int = CloseCode.GOING_AWAY, reason: str = ""
    ) -> None:
        """Stop accepting (new handshakes in progress are refused with 503);
        with `close_connections`, close open connections with `code` (1001 by
        default). wait_closed() returns once every connection is closed and
        every handler has returned. May be called again, e.g. first with
        close_connections=False to stop accepting, later with True."""
        self._closing = True
        self.server.close()
        if close_connections and not self._closing_connections:
            self._closing_connections = True
            self.logger.info(
                "websocket server closing its connections",
                extra={"connections": len(self.connections), "close_code": int(code)},
            )
            for connection in list(self.connections):
                if connection.state is State.OPEN:
                    task = asyncio.get_running_loop().create_task(connection.close(code, reason))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
                elif connection.state is State.CONNECTING and connection.request is None:
                    connection.transport.abort()  # no request yet: nothing to answer
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        while self.connections:
            await asyncio.gather(
                *(connection.wait_closed() for connection in list(self.connections))
            )
        while self._handlers:
            await asyncio.gather(*list(self._handlers), return_exceptions=True)
        await self.server.wait_closed()
        self._closed.set_result(None)
        self.logger.info("websocket server closed", extra={})

    async def wait_closed(self) -> None:
        """Wait until close() has finished: every connection closed and every
        handler returned."""
        await asyncio.shield(self._closed)

    async def serve_forever(self) -> None:
        """Wait until the server is closed; cancelling it closes the server."""
        try:
            await self.wait_closed()
        except asyncio.CancelledError:
            self.close()
            await self.wait_closed()
            raise

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    # -- called by Connection ------------------------------------------------

    def _new_connection(self) -> Connection:
        return Connection(self, self.settings)

    def _connection_made(self, connection: Connection) -> None:
        self.connections.add(connection)

    def _connection_lost(self, connection: Connection) -> None:
        self.connections.discard(connection)

    def _start_handler(self, connection: Connection, run: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(run)
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)


async def serve(
    handler: Handler,
    host: str | Sequence[str] | None = None,
    port: int = 0,
    *,
    process_request: ProcessRequest | None = None,
    select_subprotocol: SelectSubprotocol | None = None,
    subprotocols: Sequence[str] | None = None,
    ssl: ssl_module.SSLContext | None = None,
    max_size: int | None = 2**20,
    max_queue: int | None = 16,
    write_limit: int = 32768,
    ping_interval: float | None = 20.0,
    ping_timeout: float | None = 20.0,
    close_timeout: float = 10.0,
    open_timeout: float | None = 10.0,
    logger: logging.Logger | logging.LoggerAdapter[Any] | None = None,
    sock: socket.socket | None = None,
) -> Server:
    """Listen on `host`:`port` (port 0: a free one, see `server.sockets`) and
    run `handler(connection)` as one task per accepted WebSocket.

    - process_request(connection, request): sees each HTTP request first; a
      websockets.http11.Response it returns (or awaits to) is sent as plain
      HTTP and the connection closed; None goes on with the handshake.
    - select_subprotocol(connection, offered) / subprotocols: the
      Sec-WebSocket-Protocol negotiation (as in websockets' ServerProtocol).
    - ssl: an SSLContext to serve TLS (wss://).
    - max_size: largest message in bytes (larger: closed with 1009).
    - max_queue: complete messages held for recv(); at that many, reading
      from the socket pauses until recv() drains to a quarter of it.
    - write_limit: write buffer in bytes above which send() waits.
    - ping_interval / ping_timeout: keepalive (None or 0 turns each off); no
      pong in time closes with 1011.
    - close_timeout: a closing connection's TCP is dropped after this long.
    - open_timeout: a connection that has not finished its HTTP exchange or
      handshake after this long is dropped.
    - logger: for this server's logs (default "voice_agent.transports.sansio").
    """
    settings = Settings(
        handler=handler,
        process_request=process_request,
        select_subprotocol=select_subprotocol,
        subprotocols=subprotocols,
        max_size=max_size,
        max_queue=max_queue,
        write_limit=write_limit,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
        open_timeout=open_timeout,
        logger=logger if logger is not None else logging.getLogger(LOGGER_NAME),
    )
    server = Server(settings)
    loop = asyncio.get_running_loop()
    if sock is not None:
        server.server = await loop.create_server(server._new_connection, sock=sock, ssl=ssl)
    else:
        server.server = await loop.create_server(server._new_connection, host, port, ssl=ssl)
    settings.logger.info(
        "websocket server listening",
        extra={"addresses": [str(s.getsockname()) for s in server.server.sockets]},
    )
    return server
