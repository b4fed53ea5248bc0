"""A fake clock for code that takes `clock` (and `sleep`) injected."""

from __future__ import annotations

import asyncio


class FakeClock:
    """Time that moves only when a test advances it or the code sleeps on it.

    Pass the instance (or `.clock`) where a `() -> float` clock is wanted and
    `.sleep` where an async sleep is; `sleeps` records every sleep asked for."""

    def __init__(self, start: float = 100.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def clock(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    async def sleep(self, seconds: float) -> None:
        """Move time on by `seconds` (never back) and yield to the loop once."""
        self.sleeps.append(seconds)
        self.now += max(0.0, seconds)
        await asyncio.sleep(0)
