"""The Wyoming TCP server on the process's ConversationHost (WyomingServer,
running_wyoming): accepts connections, admits them, runs one
handler.Connection per connection, announces itself with zeroconf.

Each connection takes a place of the host's admission (`max_sessions`,
shared with the WebSocket sessions, and `max_connections_per_client` per
address) for its life; a refused one gets an `error` event with the refusal's
code (`server_full`, `address_limit`, `shutting_down`) and is closed. While
the model loads, connections are admitted (the server listens before the
engine starts, so Home Assistant's set-up gets its `info`) and each request
that needs the engine gets an `error` with code `loading`. Connections
without an event for `idle_timeout` seconds are closed (none while a
synthesis streams). `close()` stops listening, withdraws the zeroconf
service and cancels every connection (their engine turns are cancelled,
their conversations saved by the host); it does not close the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator

from wyoming.error import Error
from wyoming.info import Info

from voice_agent.config import Config, tcp_address
from voice_agent.errors import ConfigError, VoiceAgentError
from voice_agent.host import ConversationHost

from .converse import TRANSPORT
from .discovery import Announcement, announce
from .framing import LIMITS, MAX_HEADER_BYTES, Limits, write_event
from .handler import Connection
from .info import build_info
from .stats import WyomingStats

logger = logging.getLogger("voice_agent.wyoming")

CLOSE_TIMEOUT = 5.0  # seconds connections get to end after being cancelled
ANNOUNCE_TIMEOUT = 5.0  # seconds a zeroconf registration in progress gets at close


class WyomingServer:
    """See the module doc. Create inside the running loop; `await start()`."""

    def __init__(self, config: Config, host: ConversationHost, *, limits: Limits = LIMITS) -> None:
        address = tcp_address(config.wyoming or "")
        if address is None:
            raise ConfigError("wyoming must be tcp://HOST:PORT")
        self.config = config
        self.host = host
        self.bind_host, self.bind_port = address
        self.limits = limits
        self.stats = WyomingStats()
        self.announcement: Announcement | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._announcing: asyncio.Task[None] | None = None
        self._info: Info | None = None
        host.metrics.add_collector(self.stats.families)

    @property
    def port(self) -> int:
        """The port listened on (the real one when the URL said port 0)."""
        if self._server is None or not self._server.sockets:
            return self.bind_port
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"tcp://{self.bind_host}:{self.port}"

    def info(self) -> Info:
        """What `describe` gets (built once)."""
        if self._info is None:
            engine = self.host.engine
            model = os.path.basename(engine.model_name.rstrip("/")) if engine.model_name else ""
            speech = self.host.speech
            self._info = build_info(
                model, speech.name if speech is not None else None, demo=engine.demo_model
            )
        return self._info

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.bind_host, self.bind_port, limit=self.limits.header
        )
        logger.info("Wyoming server on %s", self.url)
        if self.config.wyoming_zeroconf:
            self._announcing = asyncio.create_task(self._announce(), name="wyoming-zeroconf")

    async def _announce(self) -> None:
        self.announcement = await announce(self.bind_host, self.port)

    async def close(self) -> None:
        """Stop (see the module doc); idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        if self._announcing is not None:
            # Let a registration in progress finish (then withdrawn below with
            # goodbye packets); past ANNOUNCE_TIMEOUT it is cancelled, and
            # announce() withdraws what it registered.
            await asyncio.wait([self._announcing], timeout=ANNOUNCE_TIMEOUT)
            self._announcing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcing
            self._announcing = None
        if self.announcement is not None:
            await self.announcement.close()
            self.announcement = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
        if server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), CLOSE_TIMEOUT)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        peer = writer.get_extra_info("peername")
        address = peer[0] if isinstance(peer, tuple) and peer else ""
        try:
            try:
                # Admitted while the model loads: describe is answered at once,
                # requests that need the engine get `loading` (handler.py).
                ticket = self.host.admission.admit(address, while_loading=True)
            except VoiceAgentError as exc:
                self.stats.refused += 1
                wire = self.host.report(exc, transport=TRANSPORT)
                with contextlib.suppress(ConnectionError):
                    await write_event(Error(text=wire.message, code=wire.code).event(), writer)
                return
            self.stats.open += 1
            try:
                with ticket:
                    await self._connection(reader, writer).run()
            finally:
                self.stats.open -= 1
        except asyncio.CancelledError:
            pass  # the server closes
        except Exception as exc:  # a bug: reported with its traceback, this connection only
            self.host.report(exc, transport=TRANSPORT)
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), CLOSE_TIMEOUT)

    def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Connection:
        return Connection(
            self.host,
            reader,
            writer,
            info=self.info,
            stats=self.stats,
            limits=self.limits,
            idle_timeout=self.config.idle_timeout,
            max_audio_ms=self.config.max_utterance_ms,
        )


@contextlib.asynccontextmanager
async def running_wyoming(config: Config, host: ConversationHost) -> AsyncIterator[WyomingServer]:
    """A started WyomingServer on `host` for the block (the caller closes the host)."""
    server = WyomingServer(config, host)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


__all__ = ["MAX_HEADER_BYTES", "WyomingServer", "running_wyoming"]
