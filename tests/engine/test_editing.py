"""Qwen2AudioEngine.edit_history on the tiny model (qwen2_audio/editing.py):
the edited history's ids are those of a conversation that never had what was
cut, and the KV cache is cropped to match, not dropped."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.helpers.engines import EngineFactory, collect, history_ids
from voice_agent.engine.base import (
    AppendMessage,
    AudioArray,
    Conversation,
    DropTurns,
    TruncateReply,
    TurnInput,
    TurnResult,
)
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.errors import EngineError


async def turn(engine: Qwen2AudioEngine, conv: Conversation, **kwargs: Any) -> TurnResult:
    handle = engine.submit(conv, TurnInput(**kwargs))
    await collect(handle)
    return handle.result


def prompt_ids(engine: Qwen2AudioEngine, conv: Conversation, result: TurnResult) -> list[int]:
    """The prompt of the conversation's last turn (its settled ids begin with it)."""
    return history_ids(engine, conv)[: result.usage.prompt_tokens]


async def greedy(make_engine: EngineFactory) -> Qwen2AudioEngine:
    engine: Qwen2AudioEngine = await make_engine(temperature=0.0, max_new_tokens=6)
    return engine


async def test_drop_turns_crops_the_cache(
    make_engine: EngineFactory, short_speech: AudioArray
) -> None:
    engine = await greedy(make_engine)
    conv = engine.new_conversation(system_prompt="Be brief.")
    await turn(engine, conv, audio=short_speech)
    after_first = history_ids(engine, conv)
    await turn(engine, conv, text="Dim the lights.", audio=short_speech)
    assert conv.turns == 2 and conv.audio_clips == 2
    assert await engine.edit_history(conv, DropTurns(1))
    assert conv.turns == 2 and conv.audio_clips == 1  # turns taken: never lowered
    assert history_ids(engine, conv) == after_first  # snapshot() reflects the edit
    cached = engine.cached_tokens(conv)
    assert cached is not None and 0 < cached <= len(after_first)  # cropped, not dropped
    assert "Dim the lights." not in engine.history_text(conv)
    edited = await turn(engine, conv, text="Open the door.")
    assert edited.usage.cached_tokens == cached

    fresh = engine.new_conversation(system_prompt="Be brief.")
    await turn(engine, fresh, audio=short_speech)
    assert history_ids(engine, fresh) == after_first  # greedy: the same first turn
    never = await turn(engine, fresh, text="Open the door.")
    assert prompt_ids(engine, conv, edited) == prompt_ids(engine, fresh, never)
    assert edited.text == never.text
    assert history_ids(engine, conv) == history_ids(engine, fresh)


async def test_drop_every_turn(make_engine: EngineFactory, short_speech: AudioArray) -> None:
    engine = await greedy(make_engine)
    conv = engine.new_conversation()
    await turn(engine, conv, audio=short_speech)
    await turn(engine, conv, text="And now?")
    assert not await engine.edit_history(conv, DropTurns(3))  # nothing to apply it to
    assert conv.turns == 2
    assert await engine.edit_history(conv, DropTurns(2))
    assert conv.turns == 2 and conv.audio_clips == 0
    assert history_ids(engine, conv) == [] and engine.cached_tokens(conv) is None
    edited = await turn(engine, conv, text="Hello.")
    fresh = engine.new_conversation()
    never = await turn(engine, fresh, text="Hello.")
    assert prompt_ids(engine, conv, edited) == prompt_ids(engine, fresh, never)
    assert not await engine.edit_history(conv, DropTurns(2))


async def test_truncate_reply(make_engine: EngineFactory, short_speech: AudioArray) -> None:
    engine = await greedy(make_engine)
    conv = engine.new_conversation()
    first = await turn(engine, conv, audio=short_speech)
    reply_tokens = first.usage.completion_tokens
    assert reply_tokens >= 2
    assert not await engine.edit_history(conv, TruncateReply(reply_tokens + 1))
    assert await engine.edit_history(conv, TruncateReply(1))
    snap = engine.snapshot(conv)
    assert snap is not None
    cut_text = snap.messages[-1]["content"]
    assert first.text.startswith(cut_text) and len(cut_text) < len(first.text)
    assert engine.history_text(conv).endswith(f"<|im_start|>assistant\n{cut_text}<|im_end|>\n")
    cached = engine.cached_tokens(conv)
    assert cached is not None and 0 < cached <= len(snap.ids) - 2  # cropped, not dropped

    # The same history reached by a cancel that kept one reply token.
    other = engine.new_conversation()
    handle = engine.submit(other, TurnInput(audio=short_speech))
    async for delta in handle:
        handle.cancel(keep_tokens=1)
        assert delta.tokens >= 1
    assert history_ids(engine, other) == snap.ids
    edited = await turn(engine, conv, text="Go on.")
    assert edited.usage.cached_tokens == cached
    never = await turn(engine, other, text="Go on.")
    assert prompt_ids(engine, conv, edited) == prompt_ids(engine, other, never)

    assert await engine.edit_history(conv, TruncateReply(0))
    assert engine.history_text(conv).endswith("<|im_start|>assistant\n<|im_end|>\n")
    assert await engine.edit_history(conv, AppendMessage("system", "Be brief."))
    assert not await engine.edit_history(conv, TruncateReply(0))  # the last is not a reply


async def test_append_message(make_engine: EngineFactory, short_speech: AudioArray) -> None:
    engine = await greedy(make_engine)
    conv = engine.new_conversation()
    assert await engine.edit_history(conv, AppendMessage("assistant", "Welcome home."))
    assert "<|im_start|>assistant\nWelcome home.<|im_end|>\n" in engine.history_text(conv)
    await turn(engine, conv, audio=short_speech)
    cached = engine.cached_tokens(conv)
    assert await engine.edit_history(conv, AppendMessage("system", "Answer in French."))
    assert await engine.edit_history(conv, AppendMessage("user", "Typed note."))
    assert conv.turns == 1
    assert engine.cached_tokens(conv) == cached  # prefilled with the next turn
    history = engine.history_text(conv)
    assert history.endswith(
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\nTyped note.<|im_end|>\n"
    )
    result = await turn(engine, conv, text="Hi.")
    assert result.usage.cached_tokens == cached
    prompt = engine.processor.tokenizer.decode(prompt_ids(engine, conv, result))
    assert prompt.startswith(history)
    assert prompt.endswith("<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n")
    snap = engine.snapshot(conv)
    assert snap is not None and snap.turns == 2
    assert [m["role"] for m in snap.messages] == [
        "assistant",
        "user",
        "assistant",
        "system",
        "user",
        "user",
        "assistant",
    ]
    # A conversation rebuilt from the same messages renders the same ids.
    rebuilt = engine.history_from_messages(snap.messages, snap.clips, snap.turns)
    assert rebuilt.ids == snap.ids
    # An appended reply is cut like a decoded one.
    assert await engine.edit_history(conv, AppendMessage("assistant", "Welcome back."))
    tokenizer = engine.processor.tokenizer
    kept = tokenizer.decode(tokenizer.encode("Welcome back.", add_special_tokens=False)[:2])
    assert 0 < len(kept) < len("Welcome back.")
    assert await engine.edit_history(conv, TruncateReply(2))
    assert engine.history_text(conv).endswith(f"<|im_start|>assistant\n{kept}<|im_end|>\n")
    snap = engine.snapshot(conv)
    assert snap is not None and snap.messages[-1] == {"role": "assistant", "content": kept}
    assert engine.history_from_messages(snap.messages, snap.clips, snap.turns).ids == snap.ids


async def test_edit_waits_for_a_cancelled_turn(
    make_engine: EngineFactory, short_speech: AudioArray
) -> None:
    engine: Qwen2AudioEngine = await make_engine(max_new_tokens=64)
    conv = engine.new_conversation()
    first = engine.submit(conv, TurnInput(text="first"))
    pieces = aiter(first)
    await anext(pieces)  # decoding: a cancel now settles it into the history
    first.cancel(keep_tokens=0)
    edited = engine.edit_history(conv, DropTurns(1))
    second = engine.submit(conv, TurnInput(text="second"))
    async for _ in pieces:
        pass
    await collect(second)
    assert first.result.cancelled
    assert await edited
    assert conv.turns == 2
    history = engine.history_text(conv)
    assert "first" not in history and "<|im_start|>user\nsecond<|im_end|>" in history
    assert history.count("<|im_start|>user") == 1


async def test_edit_discards_a_speculative_prefill(
    make_engine: EngineFactory, short_speech: AudioArray
) -> None:
    engine = await greedy(make_engine)
    conv = engine.new_conversation()
    await turn(engine, conv, text="Hello.")
    ids = history_ids(engine, conv)
    assert engine.prefill_speculative(conv, short_speech)
    for _ in range(200):
        if engine.speculating(conv):
            break
        await asyncio.sleep(0.05)
    assert engine.speculating(conv)
    assert await engine.edit_history(conv, AppendMessage("system", "Be brief."))
    assert not engine.speculating(conv)
    cached = engine.cached_tokens(conv)
    assert cached is not None and cached <= len(ids)  # the speculation's tokens are gone
    result = await turn(engine, conv, audio=short_speech)
    assert result.usage.cached_tokens == cached
    assert engine.stats["speculative_hits"] == 0


async def test_edits_of_a_closed_engine_fail(make_engine: EngineFactory) -> None:
    engine: Qwen2AudioEngine = await make_engine()
    conv = engine.new_conversation()
    await engine.close()
    failed = engine.edit_history(conv, DropTurns())
    assert isinstance(failed.exception(), EngineError)
    engine.edit_history(conv, DropTurns())  # ignored: never "exception never retrieved"
