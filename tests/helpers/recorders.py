"""Recording the events a session sends, and waiting for some."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from voice_agent.protocol import ReplyDone, ServerEvent

E = TypeVar("E", bound=ServerEvent)

DEFAULT_WAIT = 20.0  # generous: these machines have 2 cores


class EventRecorder:
    """The `send` callback of a LiveSession (or host session): keeps every
    event; `until` waits for a condition on them. Use the instance itself or
    its `send` method as the callback."""

    def __init__(self) -> None:
        self.events: list[ServerEvent] = []
        self._changed = asyncio.Event()

    async def __call__(self, event: ServerEvent) -> None:
        self.events.append(event)
        self._changed.set()

    async def send(self, event: ServerEvent) -> None:
        await self(event)

    def of(self, kind: type[E]) -> list[E]:
        """The recorded events of one type, in order."""
        return [e for e in self.events if isinstance(e, kind)]

    async def until(
        self, test: Callable[[list[ServerEvent]], bool], timeout: float = DEFAULT_WAIT
    ) -> None:
        """Return once `test(events)` holds (checked after each event)."""
        async with asyncio.timeout(timeout):
            while not test(self.events):
                self._changed.clear()
                await self._changed.wait()

    async def until_done(self, n: int = 1, timeout: float = DEFAULT_WAIT) -> list[ReplyDone]:
        """Wait for `n` ReplyDone events in all; they are returned."""
        await self.until(count_at_least(ReplyDone, n), timeout)
        return self.of(ReplyDone)


def count_at_least(kind: type[ServerEvent], n: int) -> Callable[[list[ServerEvent]], bool]:
    """A test for `EventRecorder.until`: at least `n` events of `kind`."""
    return lambda events: sum(isinstance(e, kind) for e in events) >= n
