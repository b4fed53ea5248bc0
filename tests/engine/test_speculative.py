"""Speculative prefill: the utterance so far is prefilled during the hangover."""

from __future__ import annotations

from tests.helpers.engines import EngineFactory, collect, history_ids
from tests.helpers.waiting import until
from voice_agent.engine.base import AudioArray, TurnInput


async def _reference(make_engine: EngineFactory, turns: list[TurnInput]) -> tuple[list[int], str]:
    engine = await make_engine(max_new_tokens=12)
    conv = engine.new_conversation()
    for t in turns:
        await collect(engine.submit(conv, t))
    return history_ids(engine, conv), engine.history_text(conv)


async def test_matching_turn_takes_over_the_speculative_prefill(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    turns = [TurnInput(text="Hello."), TurnInput(audio=speech)]
    ref_ids, ref_text = await _reference(make_engine, turns)
    engine = await make_engine(max_new_tokens=12)
    conv = engine.new_conversation()
    await collect(engine.submit(conv, turns[0]))
    assert engine.stats["prefills"] == 1
    assert engine.prefill_speculative(conv, speech.copy())
    await until(lambda: engine.speculating(conv))
    assert engine.stats["prefills"] == 2
    handle = engine.submit(conv, TurnInput(audio=speech.copy()))
    await collect(handle)
    assert engine.stats["prefills"] == 2  # no prefill for the real turn: decoding started at once
    assert engine.stats["speculative_hits"] == 1
    assert handle.result.usage.cached_tokens > 0
    assert history_ids(engine, conv) == ref_ids
    assert engine.history_text(conv) == ref_text


async def test_a_different_turn_discards_it(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    turns = [TurnInput(audio=short_speech), TurnInput(audio=speech)]
    ref_ids, _ = await _reference(make_engine, turns)
    engine = await make_engine(max_new_tokens=12)
    conv = engine.new_conversation()
    await collect(engine.submit(conv, turns[0]))
    history = len(history_ids(engine, conv))
    # Speech resumed after the first 3 s: the real utterance is longer.
    assert engine.prefill_speculative(conv, speech[: 16000 * 3])
    await until(lambda: engine.speculating(conv))
    cached = engine.cached_tokens(conv)
    assert cached is not None and cached > history
    handle = engine.submit(conv, turns[1])
    await collect(handle)
    assert engine.stats == engine.stats | {"speculative_hits": 0, "speculative_misses": 1}
    # The cache was cropped back to the history (which the speculative prefill
    # had completed), then reused for the real turn.
    assert handle.result.usage.cached_tokens == history
    assert history_ids(engine, conv) == ref_ids


async def test_discard_crops_the_cache_back(
    make_engine: EngineFactory, short_speech: AudioArray
) -> None:
    engine = await make_engine(max_new_tokens=6)
    conv = engine.new_conversation()
    await collect(engine.submit(conv, TurnInput(text="Hello.")))
    assert engine.prefill_speculative(conv, short_speech)
    await until(lambda: engine.speculating(conv))
    engine.discard_speculative(conv)
    await until(lambda: not engine.speculating(conv))
    # History tokens the speculative prefill fed (the reply's end) stay cached.
    history = len(history_ids(engine, conv))
    assert engine.cached_tokens(conv) == history
    handle = engine.submit(conv, TurnInput(text="Again."))
    await collect(handle)
    assert handle.result.usage.cached_tokens == history


async def test_no_speculation_while_a_turn_runs(
    make_engine: EngineFactory, short_speech: AudioArray
) -> None:
    engine = await make_engine(max_new_tokens=4)
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(audio=short_speech))
    assert not engine.prefill_speculative(conv, short_speech)  # a turn is queued: refused
    await collect(handle)
    assert engine.prefill_speculative(conv, short_speech)  # idle again
    await until(lambda: engine.speculating(conv))
