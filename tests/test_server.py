"""server.py: the event loop `serve` runs on (Config.event_loop)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

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


async def test_running_shares_one_host_and_shuts_down_in_its_order(tmp_path: Path) -> None:
    """running(): one ConversationHost for the app (and MQTT); on exit the
    reply in flight is cancelled after the drain, the session is saved to the
    store and its client closed with 1001, then the engine is closed."""
    from voice_agent.client import RealtimeClient
    from voice_agent.engine.scripted import ScriptedEngine
    from voice_agent.protocol import ReplyCancelled, ReplyDelta, ReplyDone
    from voice_agent.server import running
    from voice_agent.store import Store

    db = tmp_path / "conversations.db"
    config = Config(host="127.0.0.1", port=0, db=str(db), tts="none", drain_timeout=0)
    engine = ScriptedEngine(["short", " ".join(["long"] * 2000)], token_delay=0.01)
    client = RealtimeClient("")
    async with running(config, engine) as services:
        host = services.host
        assert host is not None and services.app.host is host
        assert host.config_for(None) is host.session_config  # built once
        client = RealtimeClient(services.app.url)
        await client.connect()
        sid = (await client.start()).session_id
        await client.send_text("first")
        assert (await client.wait_for(ReplyDone, 20)).text == "short"
        await client.send_text("second")
        await client.wait_for(ReplyDelta, 20)
    try:
        assert await client.wait_closed(20) == 1001
        assert [e.reason for e in client.of_type(ReplyCancelled)] == ["client"]
    finally:
        await client.close()
    assert not engine.started
    store = Store(db)
    try:
        record = store.load(sid)
        assert record is not None and record.history.turns == 2  # the cancelled one too
    finally:
        store.close()
