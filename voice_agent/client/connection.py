"""RealtimeClient: one realtime WebSocket session (connect, send, wait for events)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from voice_agent.protocol import (
    ErrorEvent,
    ReplyCancelled,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SessionStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    decode_server,
)

E = TypeVar("E")
EventCallback = Callable[[ServerEvent], object]
AudioCallback = Callable[[bytes], object]


class ClientClosed(Exception):
    """The connection closed while waiting for an event; `code` is the close code."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed (code {code})")
        self.code = code


class RealtimeClient:
    """One realtime WebSocket session. Use as an async context manager."""

    def __init__(
        self,
        url: str,
        *,
        on_event: EventCallback | None = None,
        open_timeout: float = 10.0,
        max_size: int | None = 16 * 2**20,
        on_audio: AudioCallback | None = None,
    ) -> None:
        self.url = url
        self.on_event = on_event
        self.on_audio = on_audio  # each binary frame (reply audio), in order with the events
        self.open_timeout = open_timeout
        self.max_size = max_size
        self.received: list[ServerEvent] = []  # every event, in arrival order
        self.audio_bytes = 0  # server-to-client binary frames (spoken replies)
        self.text_turns_sent = 0
        self.session: SessionStarted | None = None
        self._ws: ClientConnection | None = None
        self._queue: asyncio.Queue[ServerEvent | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._eof = False

    # -- connection -------------------------------------------------------

    async def connect(self) -> RealtimeClient:
        self._ws = await ws_connect(
            self.url, open_timeout=self.open_timeout, max_size=self.max_size
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> RealtimeClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def ws(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError("not connected")
        return self._ws

    @property
    def ended(self) -> bool:
        """The connection has ended: no more events will arrive."""
        return self._eof

    @property
    def close_code(self) -> int | None:
        """The close code the server sent (None while open)."""
        return None if self._ws is None else self._ws.close_code

    async def wait_closed(self, timeout: float = 30.0) -> int | None:
        """Wait for the connection to close; its close code."""
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.close_code

    async def _read(self) -> None:
        ws = self.ws
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self.audio_bytes += len(message)
                    if self.on_audio is not None:
                        self.on_audio(message)
                    continue
                event = decode_server(message)
                self.received.append(event)
                if isinstance(event, SessionStarted):
                    self.session = event
                if self.on_event is not None:
                    self.on_event(event)
                self._queue.put_nowait(event)
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self._eof = True
            self._queue.put_nowait(None)
            self._changed.set()

    # -- sending ----------------------------------------------------------

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj))

    async def send_raw(self, data: str | bytes) -> None:
        """Send any frame as is (tests of malformed input)."""
        await self.ws.send(data)

    async def start(
        self, sample_rate: int = 16000, channels: int = 1, timeout: float = 30.0, **fields: Any
    ) -> SessionStarted:
        """session.start (extra fields: system_prompt, device, ...); the answer."""
        await self.send_json(
            {
                "type": "session.start",
                "sample_rate": sample_rate,
                "channels": channels,
                "format": "pcm16",
                **{k: v for k, v in fields.items() if v is not None},
            }
        )
        return await self.wait_for(SessionStarted, timeout)

    async def send_audio(self, pcm: bytes) -> None:
        await self.ws.send(pcm)

    async def send_text(self, text: str) -> None:
        self.text_turns_sent += 1
        await self.send_json({"type": "text", "text": text})

    async def commit(self) -> None:
        await self.send_json({"type": "audio.commit"})

    async def cancel(self) -> None:
        await self.send_json({"type": "cancel"})

    # -- receiving --------------------------------------------------------

    async def next_event(self, timeout: float = 30.0) -> ServerEvent:
        """The next event not consumed yet; ClientClosed at the end."""
        if self._eof and self._queue.empty():
            raise ClientClosed(self.close_code)
        event = await asyncio.wait_for(self._queue.get(), timeout)
        if event is None:
            self._queue.put_nowait(None)  # keep the end marker for later calls
            raise ClientClosed(self.close_code)
        return event

    async def events(self) -> AsyncIterator[ServerEvent]:
        """Events as they arrive until the connection closes."""
        while True:
            try:
                yield await self.next_event(timeout=3600.0)
            except ClientClosed:
                return

    async def wait_for(
        self,
        kind: type[E],
        timeout: float = 30.0,
        where: Callable[[E], bool] | None = None,
    ) -> E:
        """Consume events until one of type `kind` (matching `where`) arrives.

        Skipped events stay in `received`. TimeoutError after `timeout` seconds
        in all; ClientClosed if the connection closes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {_name(kind)} within {timeout:g} s")
            try:
                event = await self.next_event(left)
            except TimeoutError:
                raise TimeoutError(f"no {_name(kind)} within {timeout:g} s") from None
            if isinstance(event, kind) and (where is None or where(event)):
                return event

    def of_type(self, kind: type[E]) -> list[E]:
        """Received events of one type, in order."""
        return [e for e in self.received if isinstance(e, kind)]

    def settled(self) -> bool:
        """Nothing in progress: no open utterance, every reply ended and every
        closed utterance and text turn got a reply (or was dropped as busy)."""
        opened: set[str] = set()
        stopped = 0
        started: set[str] = set()
        ended: set[str] = set()
        dropped = 0
        for e in self.received:
            if isinstance(e, SpeechStartedEvent):
                opened.add(e.utterance_id)
            elif isinstance(e, SpeechStoppedEvent):
                opened.discard(e.utterance_id)
                stopped += 1
            elif isinstance(e, ReplyStarted):
                started.add(e.reply_id)
            elif isinstance(e, ReplyDone | ReplyCancelled):
                ended.add(e.reply_id)
            elif isinstance(e, ErrorEvent):
                if e.reply_id is not None:
                    ended.add(e.reply_id)
                elif e.code == "busy":
                    dropped += 1
        return (
            not opened
            and started <= ended
            and len(started) + dropped >= stopped + self.text_turns_sent
        )

    async def wait_settled(self, timeout: float = 120.0, quiet: float = 0.5) -> bool:
        """Wait until `settled()` has held for `quiet` seconds without a new
        event, or the connection closed; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._eof:
                return self.settled()
            self._changed.clear()
            if self.settled():
                try:
                    await asyncio.wait_for(self._changed.wait(), quiet)
                except TimeoutError:
                    return True
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait(), max(0.01, min(1.0, deadline - time.monotonic()))
                )
        return False


def connect(url: str, **kwargs: Any) -> RealtimeClient:
    """`async with connect(url) as client:`."""
    return RealtimeClient(url, **kwargs)


def _name(kind: object) -> str:
    return getattr(kind, "__name__", None) or str(kind)
