"""Pick and load the engine the CLI serves: real weights, or the loud demo model."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from voice_agent.engine.process import ProcessEngine
from voice_agent.engine.qwen2_audio import DEFAULT_MODEL, Qwen2AudioEngine
from voice_agent.engine.tiny import is_tiny_model, make_tiny_model
from voice_agent.errors import ModelLoadError

if TYPE_CHECKING:
    from voice_agent.config import Config
    from voice_agent.engine.openai import OpenAIEngine

logger = logging.getLogger("voice_agent.engine")


def engine_options(config: Config) -> dict[str, Any]:
    """The load_engine keywords that the engine's config fields map onto."""
    return {
        "max_batch": config.max_batch,
        "kv_cache_budget": config.kv_cache_budget,
        "engine_process": config.engine_process,
    }


def remote_engine(config: Config) -> OpenAIEngine:
    """The --engine openai engine (nothing to load; connects at each turn)."""
    try:
        from voice_agent.engine.openai import OpenAIEngine
    except ImportError as exc:
        raise ModelLoadError(
            f"--engine openai needs aiohttp ({exc.name}): pip install 'voice-agent[remote]'"
        ) from None
    if not config.engine_url:
        raise ModelLoadError("--engine openai needs --engine-url (the server's /v1 base URL)")
    return OpenAIEngine(
        config.engine_url,
        config.engine_model,
        config.engine_api_key,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        max_queue=config.max_queue,
        read_timeout=config.engine_timeout,
        retries=config.engine_retries,
    )


_DEMO_BANNER = (
    "=" * 72,
    "DEMO MODEL: replies are random noise.",
    "No Qwen2-Audio weights were found (tried %s in the local Hugging Face cache).",
    "Serving a tiny random-weight Qwen2-Audio from %s instead.",
    "For real answers pass --model DIR (or VOICE_AGENT_MODEL) with Qwen2-Audio weights.",
    "=" * 72,
)


def _build(name: str, engine_process: bool, **kwargs: Any) -> Qwen2AudioEngine | ProcessEngine:
    engine = ProcessEngine(name, **kwargs) if engine_process else Qwen2AudioEngine(name, **kwargs)
    engine.load()
    return engine


def load_engine(
    model: str | None, *, demo_dir: Path, **engine_kwargs: Any
) -> Qwen2AudioEngine | ProcessEngine:
    """Build and load a Qwen2AudioEngine (blocking: call it off the event loop);
    with `engine_process=True` among the keywords, the same engine in a worker
    process (ProcessEngine). `engine_options(config)` gives the config's keywords.

    `model` given: load it or raise ModelLoadError (one line, says how to fix).
    `model` None: the default hub id from the local cache only; if absent, log a
    loud warning and load (making it first if needed) the tiny demo model in
    `demo_dir`, with `demo_model=True`.
    """
    engine_process = bool(engine_kwargs.pop("engine_process", False))
    if model is not None:
        return _build(model, engine_process, **engine_kwargs)

    kwargs = {k: v for k, v in engine_kwargs.items() if k not in ("local_files_only", "demo_model")}
    try:
        return _build(DEFAULT_MODEL, engine_process, local_files_only=True, **kwargs)
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
    return _build(str(demo_dir), engine_process, demo_model=True, local_files_only=True, **kwargs)
