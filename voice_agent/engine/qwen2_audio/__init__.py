"""The Qwen2-Audio engine: one worker thread owns the model and serves every session.

Modules, one job each: engine.py (Qwen2AudioEngine: lifecycle and the Engine
API), loading.py (weights, device, special tokens), prompting.py (the new
turn's ids and features), scheduler.py (admission, batching, KV budget and LRU;
plain Python, no torch), forward.py (prefill and decode forwards, sampling),
speculative.py, output.py (deltas, settling, results) and worker.py (the loop),
with the per-conversation and per-turn records in state.py.

Importing this package loads torch only when an engine name is first used, so
`voice_agent.engine.qwen2_audio.scheduler` stays importable without it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from voice_agent.engine.qwen2_audio.engine import DEFAULT_MODEL as DEFAULT_MODEL
    from voice_agent.engine.qwen2_audio.engine import Qwen2AudioEngine as Qwen2AudioEngine
    from voice_agent.engine.qwen2_audio.loading import tune_backends as tune_backends
    from voice_agent.engine.qwen2_audio.state import MAX_CLIP_SECONDS as MAX_CLIP_SECONDS
    from voice_agent.engine.qwen2_audio.state import MIN_CLIP_SAMPLES as MIN_CLIP_SAMPLES
    from voice_agent.engine.qwen2_audio.state import _ConvState as _ConvState
    from voice_agent.engine.qwen2_audio.state import split_clips as split_clips

__all__ = [
    "DEFAULT_MODEL",
    "MAX_CLIP_SECONDS",
    "MIN_CLIP_SAMPLES",
    "Qwen2AudioEngine",
    "split_clips",
]

_WHERE = {
    "DEFAULT_MODEL": "engine",
    "Qwen2AudioEngine": "engine",
    "tune_backends": "loading",
    "MAX_CLIP_SECONDS": "state",
    "MIN_CLIP_SAMPLES": "state",
    "_ConvState": "state",
    "split_clips": "state",
}


def __getattr__(name: str) -> Any:
    if name == "_tune_backends":  # the old name
        name = "tune_backends"
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
