"""What one sans-I/O WebSocket server is configured with (shared by the
listening Server and every Connection it accepts)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

if TYPE_CHECKING:
    from voice_agent.transports.sansio.connection import Connection

LOGGER_NAME = "voice_agent.transports.sansio"


class _NoFrameLogs(logging.LoggerAdapter[logging.Logger]):
    """For websockets' ServerProtocol: it logs each frame (payload excerpts
    included) when DEBUG is on, so DEBUG is never on for it."""

    def isEnabledFor(self, level: int) -> bool:
        return level > logging.DEBUG and self.logger.isEnabledFor(level)


# The protocol's own lines ("connection open", "connection closed", ...).
PROTOCOL_LOGGER = _NoFrameLogs(logging.getLogger(LOGGER_NAME + ".protocol"))

Handler = Callable[["Connection"], Awaitable[None]]
"""Runs once per accepted WebSocket, as its own task; when it returns, the
connection is closed with 1000 (1011 when it raised)."""

ProcessRequest = Callable[["Connection", Request], "Response | Awaitable[Response | None] | None"]
"""Sees every HTTP request first: a Response is sent as plain HTTP instead of
the WebSocket handshake (static files, /healthz, 401, 403); None goes on with
the handshake."""

SelectSubprotocol = Callable[["Connection", Sequence[str]], "str | None"]
"""Picks the subprotocol (Sec-WebSocket-Protocol) among those the client offers."""


@dataclass(frozen=True, slots=True)
class Settings:
    """The knobs of serve(); see its docstring for each one."""

    handler: Handler
    process_request: ProcessRequest | None = None
    select_subprotocol: SelectSubprotocol | None = None
    subprotocols: Sequence[str] | None = None
    # Largest incoming message in bytes (the protocol closes with 1009 above it).
    max_size: int | None = 2**20
    # Complete messages waiting for recv(); reading pauses at this many.
    max_queue: int | None = 16
    # Write buffer (bytes) above which send() waits for the peer to read.
    write_limit: int = 32768
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    # Seconds a closing connection may take before its TCP is dropped.
    close_timeout: float = 10.0
    # Seconds from accept to a finished HTTP exchange or handshake.
    open_timeout: float | None = 10.0
    logger: logging.Logger | logging.LoggerAdapter[Any] = field(
        default_factory=lambda: logging.getLogger(LOGGER_NAME)
    )

    def __post_init__(self) -> None:
        if self.max_queue is not None and self.max_queue < 1:
            raise ValueError("max_queue must be at least 1 (or None: unbounded)")
        if self.close_timeout <= 0:
            raise ValueError("close_timeout must be positive")


def subprotocol_selector(
    connection: Connection, select: SelectSubprotocol
) -> Callable[[ServerProtocol, Sequence[Subprotocol]], Subprotocol | None]:
    """`select` in the shape ServerProtocol calls it (with the protocol, not
    the connection, as first argument)."""

    def select_subprotocol(
        protocol: ServerProtocol, offered: Sequence[Subprotocol]
    ) -> Subprotocol | None:
        chosen = select(connection, list(offered))
        return None if chosen is None else Subprotocol(chosen)

    return select_subprotocol
