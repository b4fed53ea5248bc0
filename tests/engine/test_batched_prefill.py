"""Batched prefill: turns that start together are prefilled in one forward."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
import torch

from tests.helpers.engines import DecodeGate, EngineFactory, collect, history_ids
from voice_agent.engine.base import AudioArray, TurnInput
from voice_agent.engine.kv import layer_tensors, new_cache, prefill_rows
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.errors import EngineError


async def _history(engine: Qwen2AudioEngine, conv: Any, turns: list[TurnInput]) -> None:
    for turn in turns:
        await collect(engine.submit(conv, turn))


def _scenario(
    speech: AudioArray, short_speech: AudioArray
) -> tuple[list[list[TurnInput]], list[TurnInput]]:
    """Five conversations: new ones and ones with earlier turns (cached), with
    audio and text turns; then one more turn each."""
    histories = [
        [],
        [TurnInput(text="Hello there.")],
        [TurnInput(audio=short_speech), TurnInput(text="Say more.")],
        [],
        [TurnInput(audio=speech[: 16000 * 2])],
    ]
    finals = [
        TurnInput(audio=speech[: 16000 * 3]),
        TurnInput(audio=short_speech, text="And this?"),
        TurnInput(text="Turn on the kitchen light."),
        TurnInput(text="What time is it?"),
        TurnInput(audio=speech[16000:]),
    ]
    return histories, finals


async def _started_together(
    engine: Qwen2AudioEngine, convs: list[Any], finals: list[TurnInput]
) -> tuple[list[Any], list[Any]]:
    """Submit the turns while the worker is held inside a decode step (a
    blocker turn decodes), so that they all start in the same iteration;
    (handles, outcomes: the deltas or the exception)."""
    gate = DecodeGate(engine, at=1)
    blocker = engine.submit(engine.new_conversation(), TurnInput(text="Wait."), max_new_tokens=3)
    assert await asyncio.to_thread(gate.reached.wait, 60)
    handles = [engine.submit(c, f) for c, f in zip(convs, finals, strict=True)]
    gate.release()
    outcomes = await asyncio.gather(
        collect(blocker), *(collect(h) for h in handles), return_exceptions=True
    )
    return handles, list(outcomes[1:])


async def _solo(
    make_engine: EngineFactory, histories: list[list[TurnInput]], finals: list[TurnInput]
) -> list[tuple[list[int], str, int]]:
    """Each conversation alone, one after the other: (ids, reply, cache length)."""
    engine = await make_engine(max_new_tokens=12)
    out = []
    for history, final in zip(histories, finals, strict=True):
        conv = engine.new_conversation()
        await _history(engine, conv, history)
        h = engine.submit(conv, final)
        await collect(h)
        out.append(_got(engine, conv, h))
    assert engine.stats["batched_prefills"] == 0
    return out


def _got(engine: Qwen2AudioEngine, conv: Any, handle: Any) -> tuple[list[int], str, int]:
    """(history ids, reply, cache length) of a settled conversation."""
    ids = history_ids(engine, conv)
    cached = engine.cached_tokens(conv)
    assert cached is not None
    return ids, handle.result.text, cached


async def test_batched_prefill_equals_one_at_a_time(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    histories, finals = _scenario(speech, short_speech)
    expected = await _solo(make_engine, histories, finals)

    engine = await make_engine(max_new_tokens=12)
    convs = [engine.new_conversation() for _ in histories]
    for conv, history in zip(convs, histories, strict=True):
        await _history(engine, conv, history)
    assert engine.stats["batched_prefills"] == 0
    handles, outcomes = await _started_together(engine, convs, finals)
    assert all(isinstance(o, list) for o in outcomes)
    # One forward prefilled all five turns.
    assert engine.stats["batched_prefills"] == 1
    assert engine.stats["batched_prefill_rows"] == 5
    assert engine.stats["max_prefill_rows"] == 5
    got = [_got(engine, c, h) for c, h in zip(convs, handles, strict=True)]
    assert got == expected  # ids, reply text and cache length of every conversation
    cached = [h.result.usage.cached_tokens for h in handles]
    assert cached[0] == cached[3] == 0 and cached[1] > 0 and cached[2] > 0 and cached[4] > 0
    assert all(h.result.usage.completion_tokens >= 4 for h in handles)
    # The caches the batch left serve the next turns (and are what one would get alone).
    for conv in (convs[0], convs[2]):
        h = engine.submit(conv, TurnInput(text="Thanks."))
        await collect(h)
        assert h.result.usage.cached_tokens > 0


async def test_bounds_split_a_crowd_into_several_batched_prefills(
    make_engine: EngineFactory,
) -> None:
    finals = [TurnInput(text="Hello, what can you do?") for _ in range(4)]
    expected = await _solo(make_engine, [[] for _ in finals], finals)
    engine = await make_engine(max_new_tokens=12)
    engine.prefill_batch_tokens = 2 * len(expected[0][0])  # room for two such rows
    convs = [engine.new_conversation() for _ in finals]
    handles, outcomes = await _started_together(engine, convs, finals)
    assert all(isinstance(o, list) for o in outcomes)
    assert engine.stats["batched_prefills"] == 2
    assert engine.stats["max_prefill_rows"] == 2
    assert [_got(engine, c, h) for c, h in zip(convs, handles, strict=True)] == expected


@pytest.mark.parametrize("where", ["prepare", "forward"])
async def test_a_failing_row_fails_only_its_turn(
    make_engine: EngineFactory,
    speech: AudioArray,
    short_speech: AudioArray,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    histories, finals = _scenario(speech, short_speech)
    expected = await _solo(make_engine, histories, finals)
    engine = await make_engine(max_new_tokens=12)
    tok = engine.processor.tokenizer
    marker = tok.encode(" zebra", add_special_tokens=False)
    if where == "prepare":

        def fault(point: str, turn: TurnInput | None) -> None:
            if point == "prepare" and turn is not None and turn.text and "zebra" in turn.text:
                raise RuntimeError("simulated preparation failure")

        engine.probe = fault
    else:
        inner = engine.model.model
        original_forward = inner.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            n = len(marker)
            for ids in kwargs["input_ids"].tolist():
                if any(ids[i : i + n] == marker for i in range(len(ids) - n + 1)):
                    raise RuntimeError("simulated model failure")
            return original_forward(*args, **kwargs)

        inner.forward = forward
    convs = [engine.new_conversation() for _ in histories]
    for conv, history in zip(convs, histories, strict=True):
        await _history(engine, conv, history)
    bad = engine.new_conversation()
    caplog.set_level(logging.WARNING, logger="voice_agent.engine")
    handles, outcomes = await _started_together(
        engine, [*convs, bad], [*finals, TurnInput(text="A zebra")]
    )
    assert isinstance(outcomes[-1], EngineError)
    assert str(outcomes[-1]) == "the model failed on this turn"
    assert all(isinstance(o, list) for o in outcomes[:-1])
    assert [_got(engine, c, h) for c, h in zip(convs, handles[:-1], strict=True)] == expected
    assert history_ids(engine, bad) == [] and engine.cached_tokens(bad) is None and bad.turns == 0
    if where == "prepare":  # the others still went together
        assert engine.stats["batched_prefills"] == 1
        assert engine.stats["batched_prefill_rows"] == 5
    else:  # the batched forward failed: one at a time, the bad row failed alone
        assert engine.stats["batched_prefills"] == 0
        assert any("prefilling them one at a time" in r.getMessage() for r in caplog.records)
    assert all("zebra" not in r.getMessage() for r in caplog.records)
    again = engine.submit(bad, TurnInput(text="Hello again."))
    await collect(again)
    assert bad.turns == 1


def test_prefill_rows_equals_solo_prefills(tiny_model_dir: Any) -> None:
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    g = torch.Generator().manual_seed(0)
    # (cached tokens, new tokens) per row: none cached, a short and a long cache.
    shapes = [(0, 9), (5, 30), (40, 3), (0, 1)]

    def ids(n: int) -> list[int]:
        return [int(x) for x in torch.randint(10, 500, (n,), generator=g)]

    def run(prompt: list[int], cache: Any, start: int) -> torch.Tensor:
        out = model.model(
            input_ids=torch.tensor([prompt]),
            position_ids=torch.arange(start, start + len(prompt)).unsqueeze(0),
            cache=cache,
            use_cache=True,
        )
        return model.lm_head(out.last_hidden_state[:, -1]).float()[0]

    with torch.inference_mode():
        history = [ids(c) for c, _ in shapes]
        new = [ids(n) for _, n in shapes]
        caches = []
        for h in history:
            cache = None
            if h:
                cache = new_cache(model.config)
                run(h, cache, 0)
            caches.append(cache)
        before = [None if c is None else [k.clone() for k, _ in layer_tensors(c)] for c in caches]
        logits, got = prefill_rows(model, new, caches, pad_id=0)
        solo_logits, solo_caches = [], []
        for h, n in zip(history, new, strict=True):
            cache = new_cache(model.config)
            if h:
                run(h, cache, 0)
            solo_logits.append(run(n, cache, len(h)))
            solo_caches.append(cache)
    for c, b in zip(caches, before, strict=True):  # the caches given are left alone
        if c is not None and b is not None:
            assert all(torch.equal(k, kb) for (k, _), kb in zip(layer_tensors(c), b, strict=True))
    for row, ref in zip(logits, solo_logits, strict=True):
        torch.testing.assert_close(row, ref, rtol=1e-5, atol=1e-5)
    for cache, ref, (c, n) in zip(got, solo_caches, shapes, strict=True):
        assert cache.get_seq_length() == ref.get_seq_length() == c + n
        for (k, v), (rk, rv) in zip(layer_tensors(cache), layer_tensors(ref), strict=True):
            assert k.shape == rk.shape and k.is_contiguous()
            torch.testing.assert_close(k, rk, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
