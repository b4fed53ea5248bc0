"""A conversation stored in SQLite and rebuilt on a fresh Qwen2AudioEngine (tiny model)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.engines import EngineFactory, collect
from voice_agent.engine.base import AudioArray, TurnInput
from voice_agent.store import Store, StoredSession

pytestmark = pytest.mark.timeout(300)


@pytest.mark.parametrize("store_audio", [True, False])
async def test_restored_conversation_continues(
    make_engine: EngineFactory,
    short_speech: AudioArray,
    tmp_path: Path,
    store_audio: bool,
) -> None:
    first = await make_engine(max_new_tokens=6)
    conv = first.new_conversation("You are terse.", "c1")
    for turn in (TurnInput(audio=short_speech[:24000]), TurnInput(text="And then?")):
        await collect(first.submit(conv, turn))
    history = first.snapshot(conv)
    assert history is not None and history.turns == 2 and len(history.clips) == 1

    store = Store(tmp_path / "c.db", store_audio=store_audio)
    store.save(StoredSession("c1", system_prompt="You are terse.", history=history))
    loaded = store.load("c1")
    store.close()
    assert loaded is not None and loaded.history.ids == history.ids

    second = await make_engine(max_new_tokens=6)
    restored = second.restore("c1", loaded.system_prompt, loaded.history)
    assert restored.turns == 2 and restored.audio_clips == 1
    assert second.runtime_stats().kv_cache_bytes == 0  # no cache: rebuilt at the next turn
    next_turn = TurnInput(text="Once more.")
    original = first.submit(conv, next_turn)
    await collect(original)
    handle = second.submit(restored, next_turn)
    await collect(handle)
    assert handle.result.usage.cached_tokens == 0  # the whole history was prefilled again
    assert handle.result.usage.prompt_tokens == original.result.usage.prompt_tokens
    a, b = first.snapshot(conv), second.snapshot(restored)
    assert a is not None and b is not None and b.turns == 3
    # the history up to the new turn is the stored one, exactly
    assert b.ids[: len(history.ids)] == history.ids
    assert b.messages[: len(history.messages)] == history.messages
    if store_audio:  # same audio (to int16 precision), same history: the same reply
        assert a.ids == b.ids
