"""Qwen2AudioEngine through the real classes on the tiny random model."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.engines import (
    DecodeGate,
    EngineFactory,
    collect,
    history_ids,
    kv_bytes_per_token,
)
from voice_agent.engine.base import AudioArray, TurnInput
from voice_agent.engine.loader import load_engine
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.errors import Busy, EngineError, ModelLoadError


def audio_tokens(engine: Qwen2AudioEngine, conv: Any) -> int:
    return history_ids(engine, conv).count(engine.model.config.audio_token_id)


async def test_voice_chat_turn(make_engine: EngineFactory, speech: AudioArray) -> None:
    engine = await make_engine()
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(audio=speech))
    deltas = await collect(handle)
    result = handle.result
    assert not result.cancelled
    assert "".join(d.text for d in deltas) == result.text
    assert [d.tokens for d in deltas] == sorted(d.tokens for d in deltas)
    assert 1 <= result.usage.completion_tokens <= 8
    assert result.usage.cached_tokens == 0
    assert result.usage.prompt_tokens > 140  # 5.86 s is about 146 audio tokens
    history = engine.history_text(conv)
    assert history.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|>" in history
    assert history.endswith(f"<|im_start|>assistant\n{result.text}<|im_end|>\n")
    assert 140 <= audio_tokens(engine, conv) <= 150
    assert conv.turns == 1 and conv.audio_clips == 1
    t = result.timing
    assert 0 <= t.queue_ms <= t.ttft_ms <= t.total_ms


async def test_audio_analysis_turn(make_engine: EngineFactory, short_speech: AudioArray) -> None:
    engine = await make_engine()
    conv = engine.new_conversation(system_prompt="Describe sounds.")
    handle = engine.submit(conv, TurnInput(audio=short_speech, text="What is this sound?"))
    await collect(handle)
    history = engine.history_text(conv)
    assert history.startswith("<|im_start|>system\nDescribe sounds.<|im_end|>\n")
    assert "<|AUDIO|><|audio_eos|>\nWhat is this sound?<|im_end|>\n<|im_start|>assistant\n" in (
        history
    )


async def test_text_only_turn(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(text="Turn on the kitchen light."))
    await collect(handle)
    history = engine.history_text(conv)
    assert "<|im_start|>user\nTurn on the kitchen light.<|im_end|>\n" in history
    assert "Audio" not in history and "<|AUDIO|>" not in history
    assert conv.audio_clips == 0


async def test_three_turns_number_clips_across_the_conversation(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    engine = await make_engine()
    conv = engine.new_conversation()
    replies = []
    for turn in (
        TurnInput(audio=speech),
        TurnInput(audio=short_speech, text="And this one?"),
        TurnInput(text="Thank you."),
    ):
        handle = engine.submit(conv, turn)
        await collect(handle)
        replies.append(handle.result)
    history = engine.history_text(conv)
    assert history.count("Audio 1: ") == 1 and history.count("Audio 2: ") == 1
    assert "Audio 3" not in history
    for r in replies:
        assert f"<|im_start|>assistant\n{r.text}<|im_end|>\n" in history
    assert history.index("Audio 1") < history.index(replies[0].text, history.index("Audio 1"))
    assert history.index("Audio 2") < history.index("And this one?")
    # The third prompt is the whole history so far; most of it came from the cache.
    third = replies[2].usage
    assert third.cached_tokens > 0
    assert third.prompt_tokens > replies[1].usage.prompt_tokens > replies[0].usage.prompt_tokens
    assert conv.turns == 3 and conv.audio_clips == 2


async def test_first_delta_arrives_while_the_turn_still_runs(
    make_engine: EngineFactory, speech: AudioArray
) -> None:
    engine = await make_engine(max_new_tokens=12)
    gate = DecodeGate(engine, at=3)
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(audio=speech))
    iterator = aiter(handle)
    first = await asyncio.wait_for(anext(iterator), timeout=60)
    assert first.tokens >= 1
    with pytest.raises(RuntimeError):
        _ = handle.result  # not finished: decoding is held at step 3
    assert await asyncio.to_thread(gate.reached.wait, 60)
    gate.release()
    rest = [d async for d in iterator]
    assert rest, "more deltas follow the first"
    assert handle.result.usage.completion_tokens > first.tokens


async def test_cancel_keeps_only_keep_tokens(
    make_engine: EngineFactory, speech: AudioArray
) -> None:
    # Reference: the same turn, not cancelled (greedy, deterministic).
    ref_engine = await make_engine(max_new_tokens=40)
    ref_conv = ref_engine.new_conversation()
    ref = ref_engine.submit(ref_conv, TurnInput(audio=speech))
    await collect(ref)
    prompt_len = ref.result.usage.prompt_tokens
    ref_reply = history_ids(ref_engine, ref_conv)[prompt_len:]

    engine = await make_engine(max_new_tokens=40)
    gate = DecodeGate(engine, at=4)
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(audio=speech))
    assert await asyncio.to_thread(gate.reached.wait, 60)
    handle.cancel(keep_tokens=2)
    gate.release()
    await collect(handle)
    result = handle.result
    assert result.cancelled
    # Stopped within one decode step of the cancel: prefill + 4 decode steps.
    assert result.usage.completion_tokens <= 5
    ids = history_ids(engine, conv)
    tokenizer = engine.processor.tokenizer
    newline = tokenizer.encode("\n", add_special_tokens=False)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids == [*ids[:prompt_len], *ref_reply[:2], im_end, *newline]
    # The cache was cropped to the prompt and the two kept tokens: the closing
    # <|im_end|> and newline are not in it yet (the next turn prefills them).
    assert engine.cached_tokens(conv) == prompt_len + 2
    assert result.text == tokenizer.decode(
        ref_reply[:2], skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    assert engine.history_text(conv).endswith(f"assistant\n{result.text}<|im_end|>\n")
    handle.cancel()  # safe to call again


async def test_long_audio_becomes_two_clips(
    make_engine: EngineFactory, long_audio: AudioArray
) -> None:
    engine = await make_engine(max_new_tokens=4)
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(audio=long_audio, text="What is playing?"))
    await collect(handle)
    history = engine.history_text(conv)
    assert "Audio 1: <|audio_bos|>" in history and "Audio 2: <|audio_bos|>" in history
    assert history.index("Audio 2") < history.index("What is playing?")
    assert conv.audio_clips == 2
    assert 870 <= audio_tokens(engine, conv) <= 880  # 750 (30 s) + 125 (5 s)


async def test_very_short_audio_is_padded(make_engine: EngineFactory) -> None:
    engine = await make_engine(max_new_tokens=2)
    conv = engine.new_conversation()
    blip = np.zeros(160, dtype=np.float32)  # 10 ms
    handle = engine.submit(conv, TurnInput(audio=blip))
    await collect(handle)
    assert audio_tokens(engine, conv) >= 2


async def _run_script(
    engine: Qwen2AudioEngine, turns: list[TurnInput]
) -> tuple[list[list[int]], list[int], list[int]]:
    conv = engine.new_conversation()
    snapshots = []
    cached = []
    completions = []
    for i, turn in enumerate(turns):
        handle = engine.submit(conv, turn)
        if i == 1:  # cancel the second turn once two reply tokens exist
            async for delta in handle:
                if delta.tokens >= 2:
                    handle.cancel(keep_tokens=2)
            assert handle.result.cancelled or handle.result.usage.completion_tokens < 16
        else:
            await collect(handle)
        snapshots.append(history_ids(engine, conv))
        cached.append(handle.result.usage.cached_tokens)
        completions.append(handle.result.usage.completion_tokens)
    return snapshots, cached, completions


async def test_kv_reuse_equals_full_rerun(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    turns = [
        TurnInput(audio=speech),
        TurnInput(audio=short_speech, text="Say more."),
        TurnInput(audio=short_speech[: 16000 * 2]),
        TurnInput(text="Thanks."),
    ]
    reuse = await make_engine(kv_reuse=True, max_new_tokens=16)
    rerun = await make_engine(kv_reuse=False, max_new_tokens=16)
    a, cached_a, done_a = await _run_script(reuse, turns)
    b, cached_b, _ = await _run_script(rerun, turns)
    assert a == b  # token for token, every turn, including after the cancel
    assert cached_b == [0, 0, 0, 0]
    assert cached_a[0] == 0 and all(c > 0 for c in cached_a[1:])
    assert done_a[0] == 16 and done_a[2] >= 4  # long enough replies to compare


async def test_failure_in_one_turn_fails_only_that_turn(
    make_engine: EngineFactory, speech: AudioArray, caplog: pytest.LogCaptureFixture
) -> None:
    engine = await make_engine()
    tok = engine.processor.tokenizer
    marker = tok.encode(" zebra", add_special_tokens=False)
    inner = engine.model.model
    original = inner.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        n = len(marker)
        for ids in kwargs["input_ids"].tolist():  # every row of a batched prefill
            if any(ids[i : i + n] == marker for i in range(len(ids) - n + 1)):
                raise RuntimeError("simulated model failure")
        return original(*args, **kwargs)

    inner.forward = forward
    good, bad = engine.new_conversation(), engine.new_conversation()
    first = engine.submit(bad, TurnInput(text="Hello."))
    await collect(first)
    before = history_ids(engine, bad)
    h_good = engine.submit(good, TurnInput(audio=speech))
    caplog.set_level(logging.ERROR, logger="voice_agent.engine")
    h_bad = engine.submit(bad, TurnInput(text="A zebra"))
    good_deltas, bad_outcome = await asyncio.gather(
        collect(h_good), collect(h_bad), return_exceptions=True
    )
    assert isinstance(bad_outcome, EngineError)
    assert str(bad_outcome) == "the model failed on this turn"
    assert isinstance(good_deltas, list) and not h_good.result.cancelled
    assert history_ids(engine, bad) == before  # the failed turn left no trace
    assert engine.cached_tokens(bad) is None  # dropped: rebuilt on the next turn
    assert any("failed" in r.getMessage() for r in caplog.records)
    assert all("zebra" not in r.getMessage() for r in caplog.records)
    again = engine.submit(bad, TurnInput(text="Hello again."))
    await collect(again)
    assert again.result.usage.cached_tokens == 0
    assert again.result.usage.prompt_tokens > len(before)
    assert bad.turns == 2


async def test_busy_when_the_queue_is_full(make_engine: EngineFactory, speech: AudioArray) -> None:
    engine = await make_engine(max_queue=2, max_new_tokens=16)
    gate = DecodeGate(engine, at=2)
    conv = engine.new_conversation()
    running = engine.submit(conv, TurnInput(audio=speech))
    assert await asyncio.to_thread(gate.reached.wait, 60)  # the first turn is active
    queued = [
        engine.submit(conv, TurnInput(text="one")),
        engine.submit(conv, TurnInput(text="two")),
    ]
    with pytest.raises(Busy):
        engine.submit(conv, TurnInput(text="three"))
    gate.release()
    for h in [running, *queued]:
        await collect(h)
    # Turns of one conversation ran in order.
    history = engine.history_text(conv)
    assert history.index("user\none") < history.index("user\ntwo")
    assert conv.turns == 3


async def test_conversations_progress_concurrently(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    solo = await make_engine()
    expected = []
    for audio in (speech, short_speech):
        c = solo.new_conversation()
        h = solo.submit(c, TurnInput(audio=audio))
        await collect(h)
        expected.append(h.result.text)
    engine = await make_engine()
    convs = [engine.new_conversation(), engine.new_conversation()]
    handles = [
        engine.submit(c, TurnInput(audio=a))
        for c, a in zip(convs, (speech, short_speech), strict=True)
    ]
    await asyncio.gather(*(collect(h) for h in handles))
    assert [h.result.text for h in handles] == expected


async def test_close_cancels_turns_in_flight(
    make_engine: EngineFactory, speech: AudioArray
) -> None:
    engine = await make_engine(max_new_tokens=200)
    gate = DecodeGate(engine, at=2)
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(audio=speech))
    assert await asyncio.to_thread(gate.reached.wait, 60)
    gate.release()
    await engine.close()
    await asyncio.wait_for(collect(handle), timeout=30)
    assert handle.result.cancelled


def test_bad_model_path_is_one_line(tmp_path: Path) -> None:
    engine = Qwen2AudioEngine(str(tmp_path / "no-such-dir"))
    with pytest.raises(ModelLoadError) as info:
        engine.load()
    message = str(info.value)
    assert "\n" not in message
    assert "no such directory" in message and "make-tiny-model" in message


def test_directory_without_weights_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        Qwen2AudioEngine(str(tmp_path)).load()
    assert "\n" not in str(info.value)
    assert str(tmp_path) in str(info.value)


def test_uncached_hub_id_is_one_line() -> None:
    engine = Qwen2AudioEngine("nobody/not-a-model", local_files_only=True)
    with pytest.raises(ModelLoadError) as info:
        engine.load()
    assert "\n" not in str(info.value)
    assert "make-tiny-model" in str(info.value)


def test_loader_falls_back_to_the_demo_model(
    tiny_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="voice_agent.engine")
    engine = load_engine(None, demo_dir=tiny_model_dir, max_new_tokens=4)
    assert engine.demo_model and engine.loaded
    assert engine.max_new_tokens == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("DEMO MODEL: replies are random noise" in w for w in warnings)
    assert len(warnings) >= 3


def test_loader_given_model_fails_loudly(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        load_engine(str(tmp_path / "missing"), demo_dir=tmp_path / "demo")
    assert not (tmp_path / "demo").exists()


async def test_submit_after_close_is_refused(make_engine: EngineFactory) -> None:
    engine = await make_engine()
    conv = engine.new_conversation()
    await engine.close()
    with pytest.raises(EngineError):
        engine.submit(conv, TurnInput(text="hello"))


async def test_sampling_is_seeded(make_engine: EngineFactory, short_speech: AudioArray) -> None:
    texts = []
    for _ in range(2):
        engine = await make_engine(temperature=0.8, top_p=0.9, seed=7, max_new_tokens=12)
        conv = engine.new_conversation()
        handle = engine.submit(conv, TurnInput(audio=short_speech))
        await collect(handle)
        texts.append(engine.history_text(conv))
    assert texts[0] == texts[1]


async def test_runtime_stats_and_readiness(
    make_engine: EngineFactory, speech: AudioArray, short_speech: AudioArray
) -> None:
    from voice_agent.engine.base import EngineStats

    engine = await make_engine(max_new_tokens=40)
    assert await engine.ready()
    assert engine.runtime_stats() == EngineStats()  # nothing held yet
    gate = DecodeGate(engine, at=3)  # both turns decode together by step 3
    convs = [engine.new_conversation(), engine.new_conversation()]
    handles = [
        engine.submit(c, TurnInput(audio=a))
        for c, a in zip(convs, (speech, short_speech), strict=True)
    ]
    assert await asyncio.to_thread(gate.reached.wait, 60)
    busy = engine.runtime_stats()  # read while the worker is inside a decode step
    assert busy.batch_size == 2
    per_token = kv_bytes_per_token(engine)
    # two rows, padded to the longer one, which holds at least its 25 audio tokens a second
    assert busy.kv_cache_bytes >= 2 * per_token * int(len(speech) / 16000 * 25)
    engine.worker_stall_s = 0.05  # the worker is stuck in that step: not answering
    await asyncio.sleep(0.1)
    assert not await engine.ready()
    engine.worker_stall_s = 60.0
    gate.release()
    await asyncio.gather(*(collect(h) for h in handles))
    idle = engine.runtime_stats()
    assert idle.batch_size == 0 and idle.queued == 0
    # the idle conversations keep their caches (kv_reuse): one entry per history token
    # (the cache stops one short of the history's closing newline, hence the bound)
    history = sum(len(history_ids(engine, c)) for c in convs)
    assert history * per_token >= idle.kv_cache_bytes > (history - 8) * per_token
    assert await engine.ready()
    for c in convs:
        engine.release(c)
    assert engine.runtime_stats().kv_cache_bytes == 0
    await engine.close()
    assert not await engine.ready()


def test_cuda_engine_turns_off_cudnn_attention() -> None:
    """cuDNN attention plans anew for every query/key length (every decode step);
    an engine on CUDA turns it off, one on the CPU leaves the setting alone."""
    import torch

    from voice_agent.engine.qwen2_audio import tune_backends

    enabled: Any = torch.backends.cuda.cudnn_sdp_enabled  # untyped in torch
    before = enabled()
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        tune_backends(torch.device("cpu"))
        assert enabled()
        tune_backends(torch.device("cuda"))
        assert not enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)
