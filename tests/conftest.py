"""Fixtures shared by every test package (the helpers behind them live in
tests/helpers/)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.devices import write_devices
from tests.helpers.paths import AUDIO_DIR
from tests.helpers.postgres import PostgresServer, postgres_bin, running_postgres


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
    return AUDIO_DIR


@pytest.fixture
def devices_file(tmp_path: Path) -> Path:
    """tests.helpers.devices.DEVICES_TOML written to the test's directory."""
    return write_devices(tmp_path)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole run (Debian's `postgresql`
    package; skipped only when its binaries are missing); see
    tests.helpers.postgres.running_postgres."""
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    with running_postgres(bindir) as server:
        yield server
