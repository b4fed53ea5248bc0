"""The outbox of one WebSocket: what is sent to the client, bounded, in order.

A queue of at most `size` encoded events and binary audio frames and at
most `max_bytes` bytes (SEND_QUEUE_BYTES, 1 MiB, by default; a text event
counts its characters), written by one task. `put(data)` never waits: False
means the queue is full (by count, or `data` would take it over `max_bytes`),
i.e. the client stopped reading (the connection closes it with 1008,
errors.SlowClient; other clients are not affected); one event larger than
the bound is still taken when nothing is queued. Reply audio (`put_audio`)
takes at most half of the queue, by count and by bytes, and waits for room,
so events always find some: a client that does not read holds at most
`max_bytes` here (plus the transport's write buffer, 32 KiB), however long
it stays. `flush(timeout)` waits (bounded) until what is queued was written.
`last_write` is the loop time of the last message written (the idle
timeout does not close a session whose reply audio is still going out).
`close_or_abort` closes a connection whose peer may not read the close frame.
"""

from __future__ import annotations

import asyncio
import contextlib

from websockets.exceptions import ConnectionClosed

from voice_agent.transports.sansio import Connection

# Seconds a close frame may wait for a peer that does not read before the TCP
# connection is dropped (Config.close_timeout when it has one).
CLOSE_TIMEOUT = 5.0

# Bytes one connection may have queued (events and audio; see the module doc):
# 8 s of 16 kHz reply audio in its half, 2.7 s at 48 kHz.
SEND_QUEUE_BYTES = 1 << 20


class Outbox:
    """See the module doc. `start()` inside the running loop."""

    def __init__(self, ws: Connection, size: int, max_bytes: int = SEND_QUEUE_BYTES) -> None:
        self.ws = ws
        self._queue: asyncio.Queue[str | bytes] = asyncio.Queue(size)
        self.max_bytes = max(1, max_bytes)
        self.queued_bytes = 0  # what is queued, in bytes (text: characters)
        self.last_write = 0.0  # loop time the last message was written (0: none)
        self._room = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self.closed = False

    @property
    def queued(self) -> int:
        """Events and audio frames waiting to be written."""
        return self._queue.qsize()

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name="ws-writer")

    def put(self, data: str | bytes) -> bool:
        """Queue without waiting; False: full (the client is not reading)."""
        if self.closed:
            return True
        if self.queued_bytes and self.queued_bytes + len(data) > self.max_bytes:
            return False
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            return False
        self.queued_bytes += len(data)
        return True

    async def put_audio(self, pcm: bytes) -> None:
        """Queue one binary frame of reply audio; waits while the queue is half
        full (by count or by bytes)."""
        queue = self._queue
        half = self.max_bytes // 2
        while not self.closed and (
            queue.qsize() >= max(1, queue.maxsize // 2)
            or (self.queued_bytes and self.queued_bytes + len(pcm) > half)
        ):
            self._room.clear()
            await self._room.wait()
        if not self.closed:
            queue.put_nowait(pcm)
            self.queued_bytes += len(pcm)

    async def _write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await self._queue.get()
            try:
                await self.ws.send(data)
                self.last_write = loop.time()
            except ConnectionClosed:
                return
            finally:
                self.queued_bytes -= len(data)
                self._queue.task_done()
                self._room.set()

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until the queued events are written."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout)

    def stop_writing(self) -> None:
        """Nothing more is written or queued (a slow client being closed)."""
        self.closed = True
        self._room.set()
        if self._writer is not None:
            self._writer.cancel()

    async def close(self) -> None:
        """Stop the writer and wait for it."""
        self.stop_writing()
        if self._writer is not None:
            await asyncio.gather(self._writer, return_exceptions=True)


async def close_or_abort(
    ws: Connection, code: int, reason: str, timeout: float = CLOSE_TIMEOUT
) -> None:
    """Close with `code`; if the peer does not take the close frame within
    `timeout` (it stopped reading, so websockets waits on the write buffer for
    ever), drop the TCP connection."""
    task = asyncio.create_task(ws.close(code, reason))
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        ws.transport.abort()
        await asyncio.gather(task, return_exceptions=True)
