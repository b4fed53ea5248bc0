"""server.py: the event loop `serve` runs on (Config.event_loop)."""

from __future__ import annotations

import asyncio
import sys

import pytest

from voice_agent.config import Config
from voice_agent.errors import ConfigError
from voice_agent.server import loop_factory


def test_asyncio_choice_keeps_the_default_loop() -> None:
    assert loop_factory("asyncio") is None


def test_auto_and_uvloop_pick_uvloop_when_installed() -> None:
    uvloop = pytest.importorskip("uvloop")
    for choice in ("auto", "uvloop"):
        factory = loop_factory(choice)
        assert factory is not None
        loop = factory()
        try:
            assert isinstance(loop, uvloop.Loop)
            assert loop.run_until_complete(asyncio.sleep(0, "ran")) == "ran"
        finally:
            loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_an_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now fails
    assert loop_factory("auto") is None
    with pytest.raises(ConfigError, match="uvloop is not installed"):
        loop_factory("uvloop")


def test_config_rejects_an_unknown_event_loop() -> None:
    with pytest.raises(ConfigError, match="event_loop"):
        Config(event_loop="trio")


def test_startup_heap_is_frozen_out_of_full_collections() -> None:
    import gc

    from voice_agent.server import freeze_startup_heap

    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    try:
        freeze_startup_heap()
        assert gc.get_freeze_count() > 1000  # the imported modules at least
    finally:
        gc.unfreeze()
