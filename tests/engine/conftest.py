"""Engine test fixtures: real audio and engines on the tiny model."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.engines import EngineFactory
from voice_agent.audio import decode
from voice_agent.engine.base import AudioArray
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine


@pytest.fixture(scope="session")
def speech(audio_dir: Path) -> AudioArray:
    """5.86 s of LibriSpeech speech, 16 kHz mono."""
    return decode(audio_dir / "librispeech-1272-128104-0000.flac")


@pytest.fixture(scope="session")
def short_speech(audio_dir: Path) -> AudioArray:
    """2.92 s TIMIT sentence."""
    return decode(audio_dir / "ldc93s1-16k-mono.wav")


@pytest.fixture(scope="session")
def long_audio(audio_dir: Path) -> AudioArray:
    """35 s of music: more than one 30 s clip."""
    music = decode(audio_dir / "music.wav")
    return np.ascontiguousarray(music[: 35 * 16000])


@pytest.fixture
async def make_engine(tiny_model_dir: Path) -> AsyncIterator[EngineFactory]:
    """Build, load and start engines on the tiny model; all are closed afterwards."""
    engines: list[Qwen2AudioEngine] = []

    async def factory(**kwargs: Any) -> Qwen2AudioEngine:
        kwargs.setdefault("max_new_tokens", 8)
        engine = Qwen2AudioEngine(str(tiny_model_dir), **kwargs)
        await engine.start()
        engines.append(engine)
        return engine

    yield factory
    for engine in engines:
        await engine.close()
