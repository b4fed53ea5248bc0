"""Continuous batching across conversations, the KV budget and the batch cache."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import torch

from tests.helpers.engines import EngineFactory, collect, history_ids, kv_bytes_per_token
from voice_agent.engine.base import AudioArray, TurnInput
from voice_agent.engine.kv import DecodeBatch, layer_tensors, new_cache
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine


def _config(layers: int) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(
        num_hidden_layers=layers, hidden_size=8, num_attention_heads=2, num_key_value_heads=2
    )


def _random_cache(config: Any, length: int, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    tensors = [
        (torch.randn(1, 2, length, 4, generator=g), torch.randn(1, 2, length, 4, generator=g))
        for _ in range(config.num_hidden_layers)
    ]
    return new_cache(config, tensors)


def test_decode_batch_pads_left_and_gives_rows_back_exactly() -> None:
    config = _config(layers=2)
    lengths = {"a": 3, "b": 7, "c": 5}
    originals = {k: _random_cache(config, n, seed=i) for i, (k, n) in enumerate(lengths.items())}
    expected = {
        k: [(k_.clone(), v.clone()) for k_, v in layer_tensors(c)] for k, c in originals.items()
    }
    batch = DecodeBatch(config)
    for key, n in lengths.items():
        batch.add(key, originals[key], n)
    assert batch.width == 7 and len(batch) == 3
    assert batch.mask is not None
    assert batch.mask.sum(dim=1).tolist() == [3, 7, 5]
    assert batch.mask[0].tolist() == [0, 0, 0, 0, 1, 1, 1]  # pads on the left
    (b_cache,) = batch.remove(["b"])
    # The longest row left: the pad columns nobody needs are trimmed.
    assert batch.width == 5 and batch.owners == ["a", "c"]
    for (k, v), (ek, ev) in zip(layer_tensors(b_cache), expected["b"], strict=True):
        assert torch.equal(k, ek) and torch.equal(v, ev)
    a_cache, c_cache = batch.remove(["a", "c"])
    assert len(batch) == 0 and batch.cache is None
    for got, key in ((a_cache, "a"), (c_cache, "c")):
        assert got.get_seq_length() == lengths[key]
        for (k, v), (ek, ev) in zip(layer_tensors(got), expected[key], strict=True):
            assert torch.equal(k, ek) and torch.equal(v, ev)


async def _history(engine: Qwen2AudioEngine, conv: Any, turns: list[TurnInput]) -> None:
    for turn in turns:
        await collect(engine.submit(conv, turn))


async def test_batched_greedy_output_equals_solo_output(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    # Four conversations with 0..3 earlier turns (different cache lengths, so
    # different left padding), then one last turn each, decoded together.
    histories = [
        [],
        [TurnInput(text="Hello there.")],
        [TurnInput(audio=short_speech), TurnInput(text="Say more.")],
        [TurnInput(audio=speech), TurnInput(text="And?"), TurnInput(audio=short_speech[:16000])],
    ]
    finals = [
        TurnInput(audio=speech[: 16000 * 3]),
        TurnInput(audio=short_speech),
        TurnInput(text="Turn on the kitchen light."),
        TurnInput(audio=speech[16000:]),
    ]
    solo = await make_engine(max_new_tokens=16)
    expected = []
    for history, final in zip(histories, finals, strict=True):
        conv = solo.new_conversation()
        await _history(solo, conv, history)
        await collect(solo.submit(conv, final))
        expected.append(history_ids(solo, conv))
    assert solo.stats["max_batch_seen"] == 1

    engine = await make_engine(max_new_tokens=16)
    convs = [engine.new_conversation() for _ in histories]
    for conv, history in zip(convs, histories, strict=True):
        await _history(engine, conv, history)
    handles = [engine.submit(c, f) for c, f in zip(convs, finals, strict=True)]
    await asyncio.gather(*(collect(h) for h in handles))
    assert engine.stats["max_batch_seen"] == 4  # all four decoded in one batch
    assert [history_ids(engine, c) for c in convs] == expected
    assert all(h.result.usage.completion_tokens >= 4 for h in handles)
    # Each conversation got its own cache back, pads removed: the prompt and
    # every reply token fed back (the last one is not, when max_new_tokens ended it).
    for conv, h in zip(convs, handles, strict=True):
        u = h.result.usage
        fed = u.completion_tokens - (1 if u.completion_tokens == 16 else 0)
        assert engine.cached_tokens(conv) == u.prompt_tokens + fed


async def test_max_batch_bounds_the_batch(
    make_engine: EngineFactory, short_speech: AudioArray
) -> None:
    engine = await make_engine(max_new_tokens=12, max_batch=2)
    convs = [engine.new_conversation() for _ in range(4)]
    handles = [engine.submit(c, TurnInput(audio=short_speech)) for c in convs]
    await asyncio.gather(*(collect(h) for h in handles))
    assert engine.stats["max_batch_seen"] == 2
    texts = {h.result.text for h in handles}
    assert len(texts) == 1  # same input, same greedy reply, whatever the batch


async def test_eviction_then_a_correct_next_turn(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    turns = [TurnInput(audio=speech), TurnInput(audio=short_speech, text="And this?")]
    reference = await make_engine(max_new_tokens=12)
    ref_conv = reference.new_conversation()
    await _history(reference, ref_conv, turns)

    probe = await make_engine(max_new_tokens=12)
    per_token = kv_bytes_per_token(probe)
    # Room for about one conversation's cache (a 5.86 s turn is ~190 tokens).
    engine = await make_engine(max_new_tokens=12, kv_cache_budget=per_token * 300)
    a, b = engine.new_conversation(), engine.new_conversation()
    await collect(engine.submit(a, turns[0]))
    assert engine.cached_tokens(a) is not None
    await collect(engine.submit(b, TurnInput(audio=speech)))
    assert engine.cached_tokens(a) is None  # least recently used: dropped
    assert engine.cached_tokens(b) is not None
    assert engine.stats["evictions"] == 1
    handle = engine.submit(a, turns[1])
    await collect(handle)
    assert handle.result.usage.cached_tokens == 0  # rebuilt from its token ids
    assert history_ids(engine, a) == history_ids(reference, ref_conv)
    assert engine.history_text(a) == reference.history_text(ref_conv)
    assert engine.cached_tokens(b) is None  # b was idle and least recent now


@pytest.mark.parametrize("budget_tokens", [50])
async def test_a_budget_smaller_than_one_turn_still_serves_it(
    make_engine: EngineFactory, short_speech: AudioArray, budget_tokens: int
) -> None:
    probe = await make_engine()
    engine = await make_engine(kv_cache_budget=kv_bytes_per_token(probe) * budget_tokens)
    convs = [engine.new_conversation() for _ in range(3)]
    handles = [engine.submit(c, TurnInput(audio=short_speech)) for c in convs]
    await asyncio.gather(*(collect(h) for h in handles))
    assert all(not h.result.cancelled and h.result.usage.completion_tokens for h in handles)
    # Over budget, turns run one at a time and no idle cache is kept.
    assert engine.stats["max_batch_seen"] == 1
    assert all(engine.cached_tokens(c) is None for c in convs)


def test_batched_step_logits_equal_solo_logits(tiny_model_dir: Any) -> None:
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    lengths = [5, 40, 17]
    prompts = [torch.randint(10, 500, (1, n), generator=g) for n in lengths]
    nxt = [7, 8, 9]

    def prefill(ids: torch.Tensor) -> Any:
        cache = new_cache(model.config)
        model.model(input_ids=ids, cache=cache, use_cache=True)
        return cache

    with torch.inference_mode():
        solo = []
        for ids, tok in zip(prompts, nxt, strict=True):
            cache = prefill(ids)
            out = model.model(
                input_ids=torch.tensor([[tok]]),
                position_ids=torch.tensor([[ids.shape[1]]]),
                cache=cache,
                use_cache=True,
            )
            solo.append(model.lm_head(out.last_hidden_state[:, -1]).float()[0])
        batch = DecodeBatch(model.config)
        for i, ids in enumerate(prompts):
            batch.add(i, prefill(ids), ids.shape[1])
        logits = batch.step(model, nxt)
    assert batch.lengths == [n + 1 for n in lengths]
    for row, ref in zip(logits, solo, strict=True):
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)


def test_decode_batch_finds_rows_by_identity() -> None:
    # Turns are dataclasses holding audio arrays: `==` between them raises
    # (arrays of different shapes), so rows must be found by identity.
    import dataclasses

    import numpy as np

    @dataclasses.dataclass
    class Owner:
        audio: Any

    config = _config(layers=1)
    first, second = Owner(np.zeros(3)), Owner(np.zeros(5))
    batch = DecodeBatch(config)
    batch.add(first, _random_cache(config, 2, seed=1), 2)
    batch.add(second, _random_cache(config, 4, seed=2), 4)
    (cache,) = batch.remove([second])
    assert cache.get_seq_length() == 4 and batch.owners == [first]
