"""--engine-process: the model in a worker process that is restarted when it dies."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from tests.helpers.engines import EngineFactory, collect, history_ids
from voice_agent.engine.base import AudioArray, DropTurns, EngineStats, TurnInput
from voice_agent.engine.process import ProcessEngine
from voice_agent.errors import EngineError, to_wire


async def test_a_killed_worker_is_restarted_and_the_next_turn_succeeds(
    tiny_model_dir: Path,
    make_engine: EngineFactory,
    speech: AudioArray,
    short_speech: AudioArray,
) -> None:
    first, last = TurnInput(audio=short_speech), TurnInput(text="Are you there?")
    reference = await make_engine(max_new_tokens=8)
    ref_conv = reference.new_conversation()
    for t in (first, last):
        await collect(reference.submit(ref_conv, t))

    engine = ProcessEngine(str(tiny_model_dir), max_new_tokens=8)
    await engine.start()
    try:
        assert engine.demo_model is True  # the worker's engine read the tiny model's mark
        conv = engine.new_conversation()
        h1 = engine.submit(conv, first)
        await collect(h1)
        assert conv.turns == 1 and conv.audio_clips == 1
        old_pid = engine.pid
        assert old_pid is not None and old_pid != os.getpid()

        # A long turn; kill the worker once it is decoding.
        doomed = engine.submit(conv, TurnInput(audio=speech), max_new_tokens=3000)
        iterator = aiter(doomed)
        await asyncio.wait_for(anext(iterator), timeout=60)
        os.kill(old_pid, signal.SIGKILL)
        try:
            async for _ in iterator:
                pass
            raise AssertionError("the turn in flight should have failed")
        except EngineError as exc:
            assert to_wire(exc).code == "internal"
            assert to_wire(exc).message == "the model failed on this turn"

        async def restarted() -> None:
            while engine.restarts < 1 or engine.pid == old_pid:
                await asyncio.sleep(0.05)

        await asyncio.wait_for(restarted(), timeout=120)
        # The new worker has the parent's log of the turns: the failed one left
        # nothing, so dropping the last submitted turn drops nothing older.
        assert not await engine.edit_history(conv, DropTurns(1, submitted=True))
        h3 = engine.submit(conv, last)
        await asyncio.wait_for(collect(h3), timeout=120)
        assert not h3.result.cancelled
        assert h3.result.usage.cached_tokens == 0  # the cache was rebuilt from the history
        # The failed turn left no trace; the history is the reference's.
        assert engine.history_ids(conv) == history_ids(reference, ref_conv)
        assert conv.turns == 2 and conv.audio_clips == 1
        assert (
            h1.result.text
            == reference.history_text(ref_conv).split("assistant\n")[1].split("<|im_end|>")[0]
        )
    finally:
        await engine.close()
    assert engine.pid is None


async def test_config_flags_reach_the_engine(
    tiny_model_dir: Path, short_speech: AudioArray
) -> None:
    from voice_agent.config import Config
    from voice_agent.engine.loader import engine_options, load_engine

    config = Config.from_sources(
        None,
        {
            "VOICE_AGENT_ENGINE_PROCESS": "1",
            "VOICE_AGENT_MAX_BATCH": "3",
            "VOICE_AGENT_KV_CACHE_BUDGET": "1000000",
        },
    )
    options = engine_options(config)
    assert options == {"max_batch": 3, "kv_cache_budget": 1000000, "engine_process": True}
    engine = await asyncio.to_thread(
        load_engine, str(tiny_model_dir), demo_dir=tiny_model_dir, max_new_tokens=3, **options
    )
    assert isinstance(engine, ProcessEngine)
    await engine.start()
    try:
        conv = engine.new_conversation()
        handle = engine.submit(conv, TurnInput(audio=short_speech))
        await collect(handle)
        assert 1 <= handle.result.usage.completion_tokens <= 3
        assert "<|audio_bos|>" in engine.history_text(conv)

        # the worker reports its health and figures every second (ready(), runtime_stats()):
        # soon an idle engine that keeps the conversation's cache
        def idle_with_cache(stats: EngineStats) -> bool:
            return stats.batch_size == 0 and stats.kv_cache_bytes > 0

        async with asyncio.timeout(20):
            while not (await engine.ready() and idle_with_cache(engine.runtime_stats())):
                await asyncio.sleep(0.05)
    finally:
        await engine.close()
    assert not await engine.ready()
    assert engine.runtime_stats() == EngineStats()


async def test_the_worker_forgets_a_released_conversation_and_reopens_it_on_resume(
    tiny_model_dir: Path,
    make_engine: EngineFactory,
    short_speech: AudioArray,
) -> None:
    """The worker held every conversation it ever opened (clips, ids) until it
    died (found by benchmarks/soak.py: its RSS grew with every session). A
    released conversation is now forgotten there once nothing of it is in
    flight, and a later turn opens it again with its settled history."""
    from tests.helpers.waiting import until

    turns = [TurnInput(audio=short_speech), TurnInput(text="And then?"), TurnInput(text="Bye.")]
    reference = await make_engine(max_new_tokens=4)
    ref_conv = reference.new_conversation()
    for t in turns:
        await collect(reference.submit(ref_conv, t))

    engine = ProcessEngine(str(tiny_model_dir), max_new_tokens=4)
    await engine.start()
    try:
        conv = engine.new_conversation()
        await collect(engine.submit(conv, turns[0]))
        await until(lambda: engine.worker_conversations == 1)
        engine.release(conv)  # the session ended with nothing in flight
        await until(lambda: engine.worker_conversations == 0)
        second = engine.submit(conv, turns[1])  # resumed
        engine.release(conv)  # ended again while its turn runs: forgotten once it settles
        await collect(second)
        await until(lambda: engine.worker_conversations == 0)
        last = engine.submit(conv, turns[2])
        await collect(last)
        assert last.result.usage.cached_tokens == 0  # rebuilt from the history sent again
        assert engine.history_ids(conv) == history_ids(reference, ref_conv)
        assert conv.turns == 3 and conv.audio_clips == 1
    finally:
        await engine.close()
