"""Fixtures shared by every test package."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversation store's default file (--db auto) lives under
    $XDG_DATA_HOME: point it at the test's own directory, never the user's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2-Audio (real classes, save_pretrained), made once per run."""
    from voice_agent.engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    """../shared/audio: real recordings for tests (see its README.md)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "audio"
