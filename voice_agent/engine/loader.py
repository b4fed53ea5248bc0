"""Pick and load the engine the CLI serves: real weights, or the loud demo model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from voice_agent.engine.qwen2_audio import DEFAULT_MODEL, Qwen2AudioEngine
from voice_agent.engine.tiny import is_tiny_model, make_tiny_model
from voice_agent.errors import ModelLoadError

logger = logging.getLogger("voice_agent.engine")

_DEMO_BANNER = (
    "=" * 72,
    "DEMO MODEL: replies are random noise.",
    "No Qwen2-Audio weights were found (tried %s in the local Hugging Face cache).",
    "Serving a tiny random-weight Qwen2-Audio from %s instead.",
    "For real answers pass --model DIR (or VOICE_AGENT_MODEL) with Qwen2-Audio weights.",
    "=" * 72,
)


def load_engine(model: str | None, *, demo_dir: Path, **engine_kwargs: Any) -> Qwen2AudioEngine:
    """Build and load a Qwen2AudioEngine (blocking: call it off the event loop).

    `model` given: load it or raise ModelLoadError (one line, says how to fix).
    `model` None: the default hub id from the local cache only; if absent, log a
    loud warning and load (making it first if needed) the tiny demo model in
    `demo_dir`, with `demo_model=True`.
    """
    if model is not None:
        engine = Qwen2AudioEngine(model, **engine_kwargs)
        engine.load()
        return engine

    kwargs = {k: v for k, v in engine_kwargs.items() if k not in ("local_files_only", "demo_model")}
    try:
        engine = Qwen2AudioEngine(DEFAULT_MODEL, local_files_only=True, **kwargs)
        engine.load()
        return engine
    except ModelLoadError as exc:
        logger.debug("default model unavailable: %s", exc)

    for line in _DEMO_BANNER:
        if "%s" in line:
            logger.warning(line, DEFAULT_MODEL if "tried" in line else demo_dir)
        else:
            logger.warning(line)
    if not is_tiny_model(demo_dir):
        try:
            make_tiny_model(demo_dir)
        except OSError as exc:
            raise ModelLoadError(
                f"cannot write the demo model to {str(demo_dir)!r}: {exc.strerror or exc}; "
                "pass --demo-model-dir DIR that is writable, or --model DIR with real weights"
            ) from exc
    engine = Qwen2AudioEngine(str(demo_dir), demo_model=True, local_files_only=True, **kwargs)
    engine.load()
    return engine
