"""Helpers for the engine tests: collecting a turn, pausing the decode loop."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from voice_agent.engine.base import Conversation, Delta, Engine, TurnHandle, TurnInput
from voice_agent.engine.kv import bytes_per_token
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine

EngineFactory = Callable[..., Any]


async def collect(handle: TurnHandle) -> list[Delta]:
    return [d async for d in handle]


class DecodeGate:
    """Blocks the worker before (batched) decode step number `at` until
    `release()`, through the engine's public `probe` hook (chained to the
    probe it finds there)."""

    def __init__(self, engine: Qwen2AudioEngine, at: int) -> None:
        self.at = at
        self.steps = 0
        self.reached = threading.Event()
        self.go = threading.Event()
        previous = engine.probe

        def gate(point: str, turn: TurnInput | None) -> None:
            if previous is not None:
                previous(point, turn)
            if point != "decode":
                return
            self.steps += 1
            if self.steps == self.at:
                self.reached.set()
                self.go.wait(timeout=60)

        engine.probe = gate

    def release(self) -> None:
        self.go.set()


def history_ids(engine: Engine, conversation: Conversation) -> list[int]:
    """A settled conversation's token ids, through the public snapshot() (a
    turn's handle has finished: the engine settles the history first)."""
    history = engine.snapshot(conversation)
    assert history is not None, "a turn of this conversation is still running"
    return history.ids


def kv_bytes_per_token(engine: Qwen2AudioEngine) -> int:
    """KV cache bytes one token costs in this loaded engine's model and dtype."""
    return bytes_per_token(engine.model.config, engine.dtype)
