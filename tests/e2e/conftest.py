"""Fixtures of the browser tests (tests/e2e/test_browser*.py): the tools they
need and the WAV files their fake microphone plays (tests.helpers.browser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.browser import make_fake_mic, require_browser_tools


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
