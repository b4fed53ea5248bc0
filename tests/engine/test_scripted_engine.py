"""ScriptedEngine: scripted replies word by word, for session/transport tests."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from voice_agent.engine.base import (
    AppendMessage,
    Conversation,
    Delta,
    DropTurns,
    History,
    TruncateReply,
    TurnInput,
)
from voice_agent.engine.scripted import ScriptedEngine, words
from voice_agent.errors import Busy, EngineError


async def collect(handle: object) -> list[Delta]:
    return [d async for d in handle]  # type: ignore[attr-defined]


def test_words_keep_their_spaces() -> None:
    assert words("Turn on  the light.") == ["Turn", " on", "  the", " light."]


async def test_replies_in_order_word_by_word() -> None:
    engine = ScriptedEngine(["Hello there.", "Light on."], token_delay=0)
    await engine.start()
    conv = engine.new_conversation()
    h1 = engine.submit(conv, TurnInput(text="hi"))
    deltas = await collect(h1)
    assert [d.text for d in deltas] == ["Hello", " there."]
    assert [d.tokens for d in deltas] == [1, 2]
    assert h1.result.text == "Hello there."
    assert h1.result.usage.completion_tokens == 2
    h2 = engine.submit(conv, TurnInput(audio=np.zeros(1600, dtype=np.float32)))
    await collect(h2)
    assert h2.result.text == "Light on."
    h3 = engine.submit(conv, TurnInput(text="again"))
    await collect(h3)
    assert h3.result.text == "Light on."  # the last reply repeats
    assert [t.text for _, t in engine.submitted] == ["hi", None, "again"]
    assert conv.turns == 3 and conv.audio_clips == 1
    assert "assistant\nHello there.<|im_end|>" in engine.history_text(conv)
    await engine.close()


async def test_callable_replies_and_injected_sleep() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    engine = ScriptedEngine(lambda t: f"you said {t.text}", token_delay=0.25, sleep=fake_sleep)
    conv = engine.new_conversation()
    h = engine.submit(conv, TurnInput(text="lamp"))
    await collect(h)
    assert h.result.text == "you said lamp"
    assert slept == [0.25, 0.25, 0.25]


async def test_cancel_keeps_keep_tokens() -> None:
    engine = ScriptedEngine(["one two three four five six"], token_delay=0)
    conv = engine.new_conversation()
    h = engine.submit(conv, TurnInput(text="count"))
    got = []
    async for d in h:
        got.append(d)
        if d.tokens == 3:
            h.cancel(keep_tokens=2)
    assert 3 <= len(got) < 6  # stops within a token or so of the cancel
    assert h.result.cancelled and h.result.text == "one two"
    assert engine.history_text(conv).endswith("assistant\none two<|im_end|>\n")
    h.cancel(keep_tokens=1)  # safe to call again


async def test_max_new_tokens() -> None:
    engine = ScriptedEngine(["a b c d"], token_delay=0)
    h = engine.submit(engine.new_conversation(), TurnInput(text="x"), max_new_tokens=2)
    await collect(h)
    assert h.result.text == "a b"


async def test_busy_when_queue_bound_hit() -> None:
    engine = ScriptedEngine(["a b c"], token_delay=0.01, max_queue=2)
    conv = engine.new_conversation()
    handles = [engine.submit(conv, TurnInput(text="1")), engine.submit(conv, TurnInput(text="2"))]
    with pytest.raises(Busy):
        engine.submit(conv, TurnInput(text="3"))
    for h in handles:
        await collect(h)
    h = engine.submit(conv, TurnInput(text="4"))  # room again
    await collect(h)


async def test_turns_of_one_conversation_run_in_order() -> None:
    engine = ScriptedEngine(lambda t: f"reply {t.text}", token_delay=0.001)
    conv = engine.new_conversation()
    h1 = engine.submit(conv, TurnInput(text="1"))
    h2 = engine.submit(conv, TurnInput(text="2"))
    await asyncio.gather(collect(h2), collect(h1))
    history = engine.history_text(conv)
    assert history.index("reply 1") < history.index("reply 2")


async def test_failing_reply_is_an_engine_error() -> None:
    def boom(turn: TurnInput) -> str:
        raise ValueError("script broke")

    engine = ScriptedEngine(boom)
    h = engine.submit(engine.new_conversation(), TurnInput(text="x"))
    with pytest.raises(EngineError):
        await collect(h)


async def test_close_cancels_in_flight() -> None:
    engine = ScriptedEngine(["a b c d e f g"], token_delay=10)
    h = engine.submit(engine.new_conversation(), TurnInput(text="x"))
    await asyncio.sleep(0)
    await engine.close()
    await asyncio.wait_for(collect(h), timeout=5)
    assert h.result.cancelled


async def _turn(engine: ScriptedEngine, conv: Conversation, text: str) -> str:
    h = engine.submit(conv, TurnInput(text=text))
    await collect(h)
    return h.result.text


async def test_drop_turns_cuts_the_history_back() -> None:
    engine = ScriptedEngine(lambda t: f"reply {t.text}", token_delay=0)
    conv = engine.new_conversation()
    for text in ("one", "two", "three"):
        await _turn(engine, conv, text)
    assert await engine.edit_history(conv, DropTurns(2))
    assert conv.turns == 3  # turns taken: an edit never lowers it
    history = engine.history_text(conv)
    assert "reply one" in history and "two" not in history and "three" not in history
    snap = engine.snapshot(conv)
    assert snap is not None and snap.turns == 3 and len(snap.messages) == 2
    assert not await engine.edit_history(conv, DropTurns(2))  # only one turn left
    assert await engine.edit_history(conv, DropTurns(1))
    assert engine.snapshot(conv) == History(turns=3)


async def test_drop_turns_counts_clips() -> None:
    engine = ScriptedEngine(["ok"], token_delay=0)
    conv = engine.new_conversation()
    await collect(engine.submit(conv, TurnInput(audio=np.zeros(1600, dtype=np.float32))))
    await collect(engine.submit(conv, TurnInput(audio=np.zeros(1600, dtype=np.float32))))
    assert conv.audio_clips == 2
    assert await engine.edit_history(conv, DropTurns())
    assert conv.audio_clips == 1 and conv.turns == 2


async def test_truncate_reply() -> None:
    engine = ScriptedEngine(["one two three"], token_delay=0)
    conv = engine.new_conversation()
    assert not await engine.edit_history(conv, TruncateReply(0))  # no reply yet
    await _turn(engine, conv, "count")
    assert not await engine.edit_history(conv, TruncateReply(4))  # beyond the reply
    assert await engine.edit_history(conv, TruncateReply(2))
    assert engine.history_text(conv).endswith("assistant\none two<|im_end|>\n")
    assert await engine.edit_history(conv, TruncateReply(0))
    assert engine.history_text(conv).endswith("assistant\n<|im_end|>\n")
    await engine.edit_history(conv, AppendMessage("system", "Be brief."))
    assert not await engine.edit_history(conv, TruncateReply(0))  # last is not a reply


async def test_append_message() -> None:
    engine = ScriptedEngine(["ok"], token_delay=0)
    conv = engine.new_conversation()
    assert await engine.edit_history(conv, AppendMessage("system", "Speak French."))
    assert await engine.edit_history(conv, AppendMessage("assistant", "Bonjour."))
    assert await engine.edit_history(conv, AppendMessage("user", "Salut"))
    assert conv.turns == 0
    await _turn(engine, conv, "ça va")
    history = engine.history_text(conv)
    assert history.endswith(
        "<|im_start|>system\nSpeak French.<|im_end|>\n"
        "<|im_start|>assistant\nBonjour.<|im_end|>\n"
        "<|im_start|>user\nSalut<|im_end|>\n"
        "<|im_start|>user\nça va<|im_end|>\n<|im_start|>assistant\nok<|im_end|>\n"
    )
    restored = engine.restore("again", None, engine.snapshot(conv) or History())
    assert engine.history_text(restored) == history and restored.turns == 1


async def test_edit_waits_for_the_cancelled_turn() -> None:
    engine = ScriptedEngine(lambda t: f"a b c d {t.text}", token_delay=0.001)
    conv = engine.new_conversation()
    h1 = engine.submit(conv, TurnInput(text="first"))
    pieces = aiter(h1)
    await anext(pieces)  # started: its cancel settles it into the history
    h1.cancel(keep_tokens=0)
    edited = engine.edit_history(conv, DropTurns(1))
    h2 = engine.submit(conv, TurnInput(text="second"))
    async for _ in pieces:  # at most the piece in flight
        pass
    await collect(h2)
    assert h1.result.cancelled and h1.result.text == ""
    assert await edited
    assert conv.turns == 2
    history = engine.history_text(conv)
    assert "first" not in history and "user\nsecond<|im_end|>" in history


async def test_drop_submitted_turns() -> None:
    def reply(turn: TurnInput) -> str:
        if turn.text == "boom":
            raise ValueError("script broke")
        return f"a b c {turn.text}"

    engine = ScriptedEngine(reply, token_delay=0.001)
    conv = engine.new_conversation()
    await _turn(engine, conv, "one")
    two = engine.submit(conv, TurnInput(text="two"))
    three = engine.submit(conv, TurnInput(text="three"))  # waits for "two"
    three.cancel(keep_tokens=0)  # before it started: it leaves nothing
    assert not await engine.edit_history(conv, DropTurns(1, submitted=True))
    await collect(two)
    await collect(three)
    assert "three" not in engine.history_text(conv) and "a b c two" in engine.history_text(conv)
    assert not await engine.edit_history(conv, DropTurns(1, submitted=True))  # three again
    assert await engine.edit_history(conv, DropTurns(2, submitted=True))  # two, three
    assert "two" not in engine.history_text(conv) and "a b c one" in engine.history_text(conv)
    # The turns dropped count as gone: the same edit again drops nothing older.
    assert not await engine.edit_history(conv, DropTurns(2, submitted=True))
    failed = engine.submit(conv, TurnInput(text="boom"))
    with pytest.raises(EngineError):
        await collect(failed)
    assert not await engine.edit_history(conv, DropTurns(1, submitted=True))
    assert await engine.edit_history(conv, DropTurns(1))  # the plain form: the last in the history
    assert engine.snapshot(conv) == History(turns=2)  # "one" and "two" were taken


async def test_edit_after_close_fails_quietly() -> None:
    engine = ScriptedEngine(["ok"], token_delay=10)
    conv = engine.new_conversation()
    h = engine.submit(conv, TurnInput(text="x"))
    pending = engine.edit_history(conv, DropTurns())
    await asyncio.sleep(0)
    await engine.close()
    await collect(h)
    with pytest.raises(EngineError):
        await pending
    with pytest.raises(EngineError):
        await engine.edit_history(conv, DropTurns())
    engine.edit_history(conv, DropTurns())  # ignored: no "never retrieved" warning
