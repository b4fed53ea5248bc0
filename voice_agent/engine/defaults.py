"""The engines' defaults, taken from Config (defined once, there).

An engine built without a Config (tests, benchmarks, serve-model's library
use) gets the same figures as `voice-agent serve` without flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from voice_agent.config import DEFAULT_MODEL, Config

__all__ = [
    "DEFAULT_MODEL",
    "ENGINE_RETRIES",
    "ENGINE_TIMEOUT",
    "KV_CACHE_BUDGET",
    "MAX_BATCH",
    "MAX_NEW_TOKENS",
    "MAX_QUEUE",
    "TEMPERATURE",
    "TOP_P",
]


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(Config) if f.name == name)


MAX_NEW_TOKENS: int = _default("max_new_tokens")
TEMPERATURE: float = _default("temperature")
TOP_P: float = _default("top_p")
MAX_QUEUE: int = _default("max_queue")
MAX_BATCH: int = _default("max_batch")
KV_CACHE_BUDGET: int = _default("kv_cache_budget")
ENGINE_TIMEOUT: float = _default("engine_timeout")  # the remote engine's read timeout
ENGINE_RETRIES: int = _default("engine_retries")
