"""Fixtures of the end-to-end tests: the tools the browser tests need and the
WAV files their fake microphone plays (tests.helpers.browser); one tiny
Qwen2-Audio engine and one Piper per module for the servers they start."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.browser import make_fake_mic, require_browser_tools
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.tts import load_tts
from voice_agent.tts.speaker import Speech


@pytest.fixture
def browser_tools() -> None:
    """Chromium and sox are required (CI installs them): fail, never skip.
    (Used by the browser modules through pytest.mark.usefixtures.)"""
    require_browser_tools()


@pytest.fixture(scope="session")
def fake_mic(audio_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sentence (2.9 s), once."""
    out = tmp_path_factory.mktemp("fake-mic") / "ldc93s1-48k.wav"
    return make_fake_mic([audio_dir / "ldc93s1-16k-mono.wav"], out)


@pytest.fixture(scope="session")
def barge_in_mic(audio_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence, a pause long enough to end the utterance (the hangover is
    0.6 s) and get a reply streaming, then another sentence over that reply."""
    out = tmp_path_factory.mktemp("fake-mic") / "barge-in-48k.wav"
    first = audio_dir / "ldc93s1-16k-mono.wav"
    second = audio_dir / "new-home-in-the-stars-16k.wav"
    return make_fake_mic([first, 2.5, second], out, before=1.5, after=3.0)


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path) -> Iterator[Qwen2AudioEngine]:
    """One real engine for the module (greedy, 12 tokens); every server of the
    module shares it. (test_browser.py has its own: loaded as the demo model.)"""
    engine = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=12, temperature=0.0)
    engine.load()
    yield engine
    asyncio.run(engine.close())


@pytest.fixture(scope="module")
def piper() -> Iterator[Speech]:
    """Piper, loaded and warmed up once for the module."""
    tts = load_tts("piper")
    assert tts is not None
    speech = Speech(tts)
    speech.warm_up()
    yield speech
    speech.close()
