"""One WebSocket connection: an asyncio.Protocol that pumps bytes between the
socket and websockets' public sans-I/O `ServerProtocol`, and the surface a
handler uses (recv, send, close, the audio fast path).

Bytes in: `data_received` feeds the protocol and acts on the events it
returns (the HTTP request, then frames). Bytes out: whatever the protocol
wants written (`data_to_send`) goes to the transport right away; an empty
chunk means "half-close" (EOF, or closing the TLS transport). Pings from the
peer are answered by the protocol itself. Whenever the protocol expects the
TCP connection to end (`close_expected`), a timer drops it after
`close_timeout` if the peer does not close it first."""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any, cast

from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from voice_agent.transports.sansio.inbox import Inbox, Message
from voice_agent.transports.sansio.keepalive import Keepalive
from voice_agent.transports.sansio.settings import (
    PROTOCOL_LOGGER,
    Settings,
    subprotocol_selector,
)

if TYPE_CHECKING:
    from voice_agent.transports.sansio.server import Server

_BINARY = Opcode.BINARY


class Connection(asyncio.Protocol):
    """One accepted connection. The handler gets it once the handshake is
    done; `process_request` sees it before (with `request` set).

    Attributes a handler reads: `request`, `response`, `remote_address`,
    `local_address`, `id`, `subprotocol`, `state`, `close_code`,
    `close_reason`, `latency` (last keepalive round trip, seconds),
    `transport` (the asyncio transport; `transport.abort()` drops the TCP),
    `queued` (messages waiting for recv()), `reading_paused`, `read_pauses`,
    `writing_paused`, and the fast path's `audio_sink` and `fast_frames`."""

    transport: asyncio.Transport

    def __init__(self, server: Server, settings: Settings) -> None:
        self._server = server
        self._settings = settings
        self._loop = asyncio.get_running_loop()
        self.logger = settings.logger
        select = settings.select_subprotocol
        self._protocol = ServerProtocol(
            subprotocols=[Subprotocol(name) for name in settings.subprotocols or ()] or None,
            select_subprotocol=subprotocol_selector(self, select) if select else None,
            max_size=settings.max_size,
            logger=PROTOCOL_LOGGER,
        )
        self.request: Request | None = None
        self.response: Response | None = None
        self.remote_address: Any = None
        self.local_address: Any = None
        # The fast path: see `audio_sink` in the package docstring.
        self.audio_sink: Callable[[bytes], bool] | None = None
        self.fast_frames = 0  # binary messages the sink took
        self._inbox = Inbox(self._loop, settings.max_queue, self._pause, self._resume)
        self._fragments: list[bytes] | None = None  # a fragmented message in progress
        self._fragmented_text = False
        self._keepalive = Keepalive(
            self._loop,
            settings.ping_interval,
            settings.ping_timeout,
            self._ping,
            self._keepalive_expired,
        )
        self._lost: asyncio.Future[None] = self._loop.create_future()
        self._connection_exc: BaseException | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._open_timer: asyncio.TimerHandle | None = None
        self._opening: asyncio.Task[None] | None = None
        self.writing_paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []

    # -- what a handler reads ------------------------------------------------

    @property
    def id(self) -> uuid.UUID:
        return self._protocol.id

    @property
    def state(self) -> State:
        return self._protocol.state

    @property
    def subprotocol(self) -> str | None:
        return self._protocol.subprotocol

    @property
    def close_code(self) -> int | None:
        """The close code the peer sent, as in websockets (None until closed;
        1006 when none came: the TCP dropped, or this side failed it)."""
        return self._protocol.close_code

    @property
    def close_reason(self) -> str | None:
        return self._protocol.close_reason

    @property
    def latency(self) -> float:
        return self._keepalive.latency

    @property
    def queued(self) -> int:
        return len(self._inbox)

    @property
    def reading_paused(self) -> bool:
        return self._inbox.paused

    @property
    def read_pauses(self) -> int:
        return self._inbox.pauses

    # -- what a handler calls ------------------------------------------------

    async def recv(self) -> str | bytes:
        """The next message (str for text, bytes for binary), in arrival order.
        Raises ConnectionClosedOK / ConnectionClosedError once the connection
        is closed and every queued message was read. Cancelling it loses
        nothing; two concurrent calls raise ConcurrencyError."""
        try:
            return await self._inbox.get()
        except EOFError:
            pass
        await asyncio.shield(self._lost)
        raise self._close_exc()

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    async def send(self, message: str | bytes) -> None:
        """Send one text (str) or binary (bytes) message. Waits while the
        transport's write buffer is over its limit (the peer reads slowly).
        Raises ConnectionClosed when the connection is closing or closed."""
        protocol = self._protocol
        if protocol.state is not State.OPEN:
            await self._closed_error()
        if isinstance(message, str):
            protocol.send_text(message.encode())
        elif isinstance(message, bytes | bytearray | memoryview):
            protocol.send_binary(message)
        else:
            raise TypeError(f"send() takes str or bytes, not {type(message).__name__}")
        self._send_data()
        if self.writing_paused:
            await self._drain()

    async def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Start the closing handshake with `code` and `reason`, then wait until
        the TCP connection is gone: the peer closes it, or it is dropped after
        `close_timeout` (also when the peer stopped reading). Idempotent."""
        protocol = self._protocol
        if protocol.state is State.OPEN:
            protocol.send_close(code, reason)
            self._send_data()
        elif protocol.state is State.CONNECTING and not self._lost.done():
            self.transport.abort()  # never opened: nothing to say goodbye to
        self._arm_close_timer()
        await asyncio.shield(self._lost)

    async def wait_closed(self) -> None:
        """Wait until the TCP connection is closed."""
        await asyncio.shield(self._lost)

    # -- asyncio.Protocol ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(high=self._settings.write_limit)
        self.remote_address = transport.get_extra_info("peername")
        self.local_address = transport.get_extra_info("sockname")
        self._server._connection_made(self)
        timeout = self._settings.open_timeout
        if timeout:
            self._open_timer = self._loop.call_later(timeout, self._open_expired)

    def data_received(self, data: bytes) -> None:
        protocol = self._protocol
        protocol.receive_data(data)
        for event in protocol.events_received():
            if type(event) is Frame:
                # The fast path, inline: this runs for every 20 ms audio frame.
                sink = self.audio_sink
                if (
                    sink is not None
                    and event.opcode is _BINARY
                    and event.fin
                    and self._inbox.waiting
                    and self._take(sink, event.data)
                ):
                    self.fast_frames += 1
                else:
                    self._on_frame(event)
            elif isinstance(event, Request):
                self._on_request(event)
        writes = protocol.data_to_send()
        if writes:
            self._write(writes)
        if self._close_timer is None and protocol.close_expected():
            self._arm_close_timer()

    def eof_received(self) -> bool | None:
        self._protocol.receive_eof()
        self._send_data()
        return None  # the transport closes itself; nothing is written after EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self._protocol.receive_eof()  # idempotent: the state becomes CLOSED
        if self._connection_exc is None:
            self._connection_exc = exc
        self._inbox.close()
        self._keepalive.stop()
        for timer in (self._close_timer, self._open_timer):
            if timer is not None:
                timer.cancel()
        if self._opening is not None and not self._opening.done():
            self._opening.cancel()
        self._lost.set_result(None)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._server._connection_lost(self)
        self.logger.debug(
            "websocket connection closed",
            extra={"connection_id": str(self.id), "close_code": self.close_code},
        )

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)

    # -- incoming frames -----------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        data = frame.data
        if type(data) is not bytes:
            data = bytes(data)
        if opcode is Opcode.BINARY:
            if not frame.fin:
                self._fragments, self._fragmented_text = [data], False
                return
            self._inbox.put(data)
        elif opcode is Opcode.TEXT:
            if frame.fin:
                self._put_text(data)
            else:
                self._fragments, self._fragmented_text = [data], True
        elif opcode is Opcode.CONT:
            fragments = self._fragments
            if fragments is None:  # the protocol refuses this; never reached
                return
            fragments.append(data)
            if frame.fin:
                self._fragments = None
                message = b"".join(fragments)
                if self._fragmented_text:
                    self._put_text(message)
                else:
                    self._inbox.put(message)
        elif opcode is Opcode.PONG:
            self._keepalive.pong(data)
        # PING: the protocol queued the pong; CLOSE: it answered and half-closed.

    def _take(self, sink: Callable[[bytes], bool], payload: bytes | bytearray | memoryview) -> bool:
        """The fast path: offer a binary message to the sink. An error there is
        logged and the message goes through recv() (or the sink's False)."""
        data = payload if type(payload) is bytes else bytes(payload)
        try:
            return bool(sink(data))
        except Exception:
            self.logger.exception(
                "audio sink failed; message delivered through recv()",
                extra={"connection_id": str(self.id), "bytes": len(data)},
            )
            return False

    def _put_text(self, data: bytes) -> None:
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            if self._connection_exc is None:
                self._connection_exc = exc
            self._protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
            return
        self._inbox.put(text)

    # -- the opening handshake -----------------------------------------------

    def _on_request(self, request: Request) -> None:
        self.request = request
        self._opening = self._loop.create_task(self._open(request))

    async def _open(self, request: Request) -> None:
        protocol = self._protocol
        response = await self._process_request(request)
        if self._lost.done():
            return
        if response is None:
            if self._server.closing:
                response = protocol.reject(503, "Server is shutting down.\n")
            else:
                response = protocol.accept(request)
        self.response = response
        protocol.send_response(response)
        if self._open_timer is not None:
            self._open_timer.cancel()
            self._open_timer = None
        self._send_data()
        if protocol.state is State.OPEN:
            self._keepalive.start()
            self._server._start_handler(self, self._run_handler())
            return
        if protocol.handshake_exc is not None:
            self.logger.info(
                "websocket handshake refused",
                extra={
                    "connection_id": str(self.id),
                    "status": response.status_code,
                    "error": type(protocol.handshake_exc).__name__,
                },
            )
        self.transport.close()  # plain HTTP answered (the response is flushed first)

    async def _process_request(self, request: Request) -> Response | None:
        process = self._settings.process_request
        if self._server.closing:
            return self._protocol.reject(503, "Server is shutting down.\n")
        if process is None:
            return None
        try:
            result = process(self, request)
            if inspect.isawaitable(result):
                result = await result
            return result
        except Exception:
            self.logger.error(
                "process_request failed",
                exc_info=True,
                extra={"connection_id": str(self.id)},
            )
            return self._protocol.reject(500, "Internal server error.\n")

    async def _run_handler(self) -> None:
        try:
            await self._settings.handler(self)
        except asyncio.CancelledError:
            self.transport.abort()
            raise
        except Exception:
            self.logger.error(
                "connection handler failed",
                exc_info=True,
                extra={"connection_id": str(self.id)},
            )
            await self.close(CloseCode.INTERNAL_ERROR)
            return
        await self.close()

    def _open_expired(self) -> None:
        self._open_timer = None
        if self._protocol.state is State.CONNECTING:
            self.logger.info("websocket opening timed out", extra={"connection_id": str(self.id)})
            self.transport.abort()

    # -- writing, closing ----------------------------------------------------

    def _send_data(self) -> None:
        writes = self._protocol.data_to_send()
        if writes:
            self._write(writes)

    def _write(self, writes: list[bytes]) -> None:
        if self._lost.done():
            return
        transport = self.transport
        for data in writes:
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                try:
                    transport.write_eof()
                except (OSError, RuntimeError):
                    transport.close()
            else:  # TLS: no half-close; close after flushing
                transport.close()

    async def _drain(self) -> None:
        if self._lost.done():
            raise self._close_exc()
        waiter = self._loop.create_future()
        self._drain_waiters.append(waiter)
        try:
            await waiter
        finally:
            self._drain_waiters.remove(waiter)
        if self._lost.done():
            raise self._close_exc()

    async def _closed_error(self) -> None:
        """Not open: wait for the TCP connection to end, then raise."""
        if self._protocol.state is State.CONNECTING and not self._lost.done():
            self.transport.abort()
        self._arm_close_timer()
        await asyncio.shield(self._lost)
        raise self._close_exc()

    def _arm_close_timer(self) -> None:
        if self._close_timer is None and not self._lost.done() and self._protocol.close_expected():
            self._close_timer = self._loop.call_later(
                self._settings.close_timeout, self._close_expired
            )

    def _close_expired(self) -> None:
        self._close_timer = None
        if not self._lost.done():
            if self._connection_exc is None:
                self._connection_exc = TimeoutError("timed out while closing the connection")
            self.logger.info(
                "websocket close timed out; dropping the connection",
                extra={"connection_id": str(self.id)},
            )
            self.transport.abort()

    def _close_exc(self) -> ConnectionClosed:
        exc = self._protocol.close_exc
        if self._connection_exc is not None:
            exc.__cause__ = self._connection_exc
        return exc

    # -- back-pressure, keepalive --------------------------------------------

    def _pause(self) -> None:
        if not self._lost.done():
            self.transport.pause_reading()

    def _resume(self) -> None:
        if not self._lost.done():
            self.transport.resume_reading()

    def _ping(self, payload: bytes) -> None:
        if self._protocol.state is State.OPEN:
            self._protocol.send_ping(payload)
            self._send_data()

    def _keepalive_expired(self) -> None:
        if self._protocol.state is not State.OPEN:
            return
        self.logger.warning("keepalive ping timed out", extra={"connection_id": str(self.id)})
        self._protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        self._send_data()
        self._arm_close_timer()
