"""SaveQueue: one thread, bounded, and what happens when the store is down or slow."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from tests.helpers.stores import MemoryStore
from voice_agent.engine.base import History
from voice_agent.host.saving import SaveQueue
from voice_agent.store import StoredSession


def record(key: str, turns: int) -> StoredSession:
    return StoredSession(session_id=key, history=History(turns=turns))


async def test_saves_run_in_order_and_reads_see_them() -> None:
    store = MemoryStore()
    saves = SaveQueue(store)
    futures = [saves.submit(record(k, 1)) for k in ("a", "b", "c")]
    # a read waits for the saves queued before it
    assert await saves.run(store.turns_of, "c") == 1
    assert [await f for f in futures if f is not None] == [True, True, True]
    assert store.saved == ["a", "b", "c"]
    assert saves.stats.saved == 3 and saves.stats.errors == 0
    await saves.close()


async def test_without_a_store_nothing_is_queued() -> None:
    saves = SaveQueue(None)
    assert saves.submit(record("a", 1)) is None
    await saves.wait_saved()
    await saves.close()


async def test_a_failing_store_is_counted_logged_once_and_serving_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voice_agent.host")
    store = MemoryStore()
    store.fail = True
    saves = SaveQueue(store)
    results = []
    for turns in (1, 2, 3):  # one at a time: none replaces another
        future = saves.submit(record(f"s{turns}", turns))
        assert future is not None
        results.append(await future)
    assert results == [False, False, False]
    assert saves.stats.errors == 3 and saves.stats.saved == 0
    with pytest.raises(OSError):
        await saves.run(store.load, "s1")
    assert saves.stats.errors == 4
    failures = [r for r in caplog.records if "failed" in r.getMessage()]
    assert len(failures) == 4
    assert [r.exc_info is not None for r in failures] == [True, False, False, False]
    store.fail = False  # the database is back
    future = saves.submit(record("s1", 4))
    assert future is not None and await future is True
    assert store.records["s1"].history.turns == 4
    assert any("works again" in r.getMessage() for r in caplog.records)
    await saves.close()


async def test_a_slow_store_keeps_pending_saves_bounded() -> None:
    store = MemoryStore()
    store.gate = threading.Event()
    saves = SaveQueue(store, max_pending=3)
    first = saves.submit(record("a", 1))
    await asyncio.to_thread(store.started.wait, 10)  # "a" is being written, held
    b, c, d = (saves.submit(record(k, 1)) for k in "bcd")
    assert saves.pending == 3
    newer_c = saves.submit(record("c", 2))  # replaces c's pending save in its place
    assert saves.pending == 3 and saves.stats.replaced == 1
    e = saves.submit(record("e", 1))  # full: the oldest pending (b) is dropped
    assert saves.pending == 3 and saves.stats.dropped == 1
    assert b is not None and b.done() and b.result() is False
    store.gate.set()
    assert [await f for f in (first, c, newer_c, d, e) if f is not None] == [True] * 5
    assert store.saved == ["a", "c", "d", "e"]
    assert store.records["c"].history.turns == 2  # the newest copy
    assert "b" not in store.records
    await saves.close()


async def test_save_after_close_is_dropped_and_counted() -> None:
    store = MemoryStore()
    saves = SaveQueue(store)
    await saves.close()
    future = saves.submit(record("late", 1))
    assert future is not None and await future is False
    assert saves.stats.dropped == 1 and not store.saved


async def test_prune_runs_behind_the_saves_once() -> None:
    store = MemoryStore()
    saves = SaveQueue(store)
    saves.submit(record("a", 1))
    saves.prune()
    saves.prune()  # one is already waiting
    await saves.close()
    assert store.prunes == 1 and store.saved == ["a"]


async def test_counters_are_exported() -> None:
    store = MemoryStore()
    store.fail = True
    saves = SaveQueue(store)
    future = saves.submit(record("a", 1))
    assert future is not None and not await future
    values = {f.name: f.samples[0].value for f in saves.families()}
    assert values["voice_agent_store_errors"] == 1
    assert values["voice_agent_store_saves_pending"] == 0
    await saves.close()
