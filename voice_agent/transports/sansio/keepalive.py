"""Keepalive pings on loop timers (no task per connection): a ping every
`interval` seconds; no pong within `timeout` seconds calls `on_timeout`."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable


class Keepalive:
    """One connection's keepalive. `ping(payload)` sends a ping frame;
    `pong(payload)` is fed every pong received. `latency` is the round trip
    of the last answered ping in seconds (0.0 until one is answered)."""

    __slots__ = (
        "_deadline",
        "_interval",
        "_loop",
        "_next",
        "_on_timeout",
        "_payload",
        "_ping",
        "_sent_at",
        "_timeout",
        "latency",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        interval: float | None,
        timeout: float | None,
        ping: Callable[[bytes], None],
        on_timeout: Callable[[], None],
    ) -> None:
        self._loop = loop
        self._interval = interval or None
        self._timeout = timeout or None
        self._ping = ping
        self._on_timeout = on_timeout
        self._next: asyncio.TimerHandle | None = None
        self._deadline: asyncio.TimerHandle | None = None
        self._payload: bytes | None = None
        self._sent_at = 0.0
        self.latency = 0.0

    def start(self) -> None:
        if self._interval is not None and self._next is None:
            self._next = self._loop.call_later(self._interval, self._send)

    def stop(self) -> None:
        for handle in (self._next, self._deadline):
            if handle is not None:
                handle.cancel()
        self._next = self._deadline = None
        self._payload = None

    def pong(self, payload: bytes) -> None:
        """A pong arrived; if it answers our ping, schedule the next one."""
        if self._payload is None or payload != self._payload:
            return  # unsolicited, or the answer to someone else's ping
        self.latency = self._loop.time() - self._sent_at
        self._payload = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if self._interval is not None and self._next is None:
            delay = max(0.0, self._interval - self.latency)
            self._next = self._loop.call_later(delay, self._send)

    def _send(self) -> None:
        self._next = None
        self._payload = os.urandom(4)
        self._sent_at = self._loop.time()
        self._ping(self._payload)
        if self._timeout is not None:
            self._deadline = self._loop.call_later(self._timeout, self._expired)
        elif self._interval is not None:  # no timeout: keep pinging regardless
            self._next = self._loop.call_later(self._interval, self._send)

    def _expired(self) -> None:
        self._deadline = None
        self._payload = None
        self._on_timeout()
