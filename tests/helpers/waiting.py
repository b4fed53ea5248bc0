"""Waiting for a condition without timing assertions: poll, with a bound."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

DEFAULT_WAIT = 60.0  # generous: these machines have 2 cores (shared)


async def until(
    check: Callable[[], bool], timeout: float = DEFAULT_WAIT, interval: float = 0.02
) -> None:
    """Poll `check()` every `interval` s until it holds; TimeoutError after `timeout` s."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(interval)
