"""Helpers for the engine tests: collecting a turn, pausing the decode loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from voice_agent.engine.base import Delta, TurnHandle
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine

EngineFactory = Callable[..., Any]


async def collect(handle: TurnHandle) -> list[Delta]:
    return [d async for d in handle]


class DecodeGate:
    """Blocks the worker inside (batched) decode step number `at` until `release()`."""

    def __init__(self, engine: Qwen2AudioEngine, at: int) -> None:
        self.at = at
        self.steps = 0
        self.reached = threading.Event()
        self.go = threading.Event()
        original = engine._decode_batch

        def gated(batch: Any, turns: Any) -> Any:
            self.steps += 1
            if self.steps == self.at:
                self.reached.set()
                self.go.wait(timeout=60)
            return original(batch, turns)

        setattr(engine, "_decode_batch", gated)  # noqa: B010 - patch the instance

    def release(self) -> None:
        self.go.set()
