"""The outbox of one WebSocket: what is sent to the client, bounded, in order.

A queue of at most `size` encoded events and binary audio frames, written
by one task. `put(data)` never waits: False means the queue is full, i.e.
the client stopped reading (the connection closes it with 1008,
errors.SlowClient; other clients are not affected). Reply audio
(`put_audio`) takes at most half of the queue and waits for room, so events
always find some. `flush(timeout)` waits (bounded) until what is queued was
written. `close_or_abort` closes a connection whose peer may not read the
close frame.
"""

from __future__ import annotations

import asyncio
import contextlib

from websockets.exceptions import ConnectionClosed

from voice_agent.transports.sansio import Connection

# Seconds a close frame may wait for a peer that does not read before the TCP
# connection is dropped (Config.close_timeout when it has one).
CLOSE_TIMEOUT = 5.0


class Outbox:
    """See the module doc. `start()` inside the running loop."""

    def __init__(self, ws: Connection, size: int) -> None:
        self.ws = ws
        self._queue: asyncio.Queue[str | bytes] = asyncio.Queue(size)
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
        try:
            self._queue.put_nowait(data)
        except asyncio.QueueFull:
            return False
        return True

    async def put_audio(self, pcm: bytes) -> None:
        """Queue one binary frame of reply audio; waits while the queue is half full."""
        queue = self._queue
        while not self.closed and queue.qsize() >= max(1, queue.maxsize // 2):
            self._room.clear()
            await self._room.wait()
        if not self.closed:
            queue.put_nowait(pcm)

    async def _write_loop(self) -> None:
        while True:
            data = await self._queue.get()
            try:
                await self.ws.send(data)
            except ConnectionClosed:
                return
            finally:
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
