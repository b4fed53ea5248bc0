"""Complete incoming messages waiting for recv(): a bounded queue that pauses
the socket's reading when full (read back-pressure).

The bound is on complete messages. One read from the socket can hold several
frames and all of them are parsed, so the queue may pass `max_queue` by the
frames of that one read; no further read happens until recv() has drained it
to a quarter of `max_queue`. Fragments in progress are held by the connection,
bounded by `max_size`."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from websockets.exceptions import ConcurrencyError

Message = str | bytes


class Inbox:
    """Messages in arrival order; one reader at a time."""

    __slots__ = (
        "_closed",
        "_high",
        "_loop",
        "_low",
        "_messages",
        "_pause",
        "_resume",
        "_waiter",
        "paused",
        "pauses",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        max_queue: int | None,
        pause: Callable[[], None],
        resume: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._messages: deque[Message] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._closed = False
        self._high = max_queue
        self._low = 0 if max_queue is None else max_queue // 4
        self._pause = pause
        self._resume = resume
        self.paused = False  # reading is paused because the queue is full
        self.pauses = 0  # how many times reading was paused

    def __len__(self) -> int:
        return len(self._messages)

    @property
    def waiting(self) -> bool:
        """A reader waits in get() and nothing is queued: the next message
        would be handed straight to it."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, message: Message) -> None:
        """Queue one message (never refuses: the bound acts by pausing reads)."""
        messages = self._messages
        messages.append(message)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        high = self._high
        if high is not None and len(messages) >= high and not self.paused:
            self.paused = True
            self.pauses += 1
            self._pause()

    async def get(self) -> Message:
        """The next message; EOFError once closed and drained. Cancelling it
        loses nothing. A second concurrent reader raises ConcurrencyError."""
        messages = self._messages
        while not messages:
            if self._closed:
                raise EOFError("inbox closed")
            if self._waiter is not None:
                raise ConcurrencyError("another coroutine is already waiting in recv()")
            waiter = self._loop.create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        message = messages.popleft()
        if self.paused and len(messages) <= self._low:
            self.paused = False
            self._resume()
        return message

    def close(self) -> None:
        """No more messages will come: a waiting reader wakes up (and gets
        EOFError once the queue is empty). Idempotent."""
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
