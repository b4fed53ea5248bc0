"""LiveSession against the ScriptedEngine: order, cancel, busy, failures, close."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.recorders import EventRecorder, count_at_least
from voice_agent.audio import decode, float_to_pcm16, frames, silence
from voice_agent.engine.base import Conversation, HistoryEdit, TurnHandle, TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import Busy
from voice_agent.live import LiveSession
from voice_agent.metrics import Metrics
from voice_agent.protocol import (
    ErrorEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    SpeechStoppedEvent,
)
from voice_agent.session import SessionConfig
from voice_agent.vad import VadConfig

pytestmark = pytest.mark.timeout(60)


def echo(turn: TurnInput) -> str:
    return f"you said {turn.text}" if turn.text else "heard some audio"


def make_live(
    engine: ScriptedEngine, rec: EventRecorder, metrics: Metrics | None = None, sid: str = "s1"
) -> LiveSession:
    return LiveSession(
        engine, rec, session_id=sid, config=SessionConfig(), metrics=metrics, max_new_tokens=64
    )


async def test_text_turns_are_answered_in_order() -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    rec = EventRecorder()
    metrics = Metrics()
    live = make_live(engine, rec, metrics)
    try:
        for word in ("one", "two", "three"):
            await live.text(word)
        await rec.until(count_at_least(ReplyDone, 3))
    finally:
        await live.close()
    done = rec.of(ReplyDone)
    assert [e.text for e in done if isinstance(e, ReplyDone)] == [
        "you said one",
        "you said two",
        "you said three",
    ]
    # every reply's events are contiguous and in order: started, deltas, done
    order = [
        (type(e).__name__, str(getattr(e, "reply_id", "")))
        for e in rec.events
        if isinstance(e, ReplyStarted | ReplyDelta | ReplyDone)
    ]
    replies = [rid for _, rid in order]
    assert replies == sorted(replies)
    for rid in ("r1", "r2", "r3"):
        kinds = [k for k, r in order if r == rid]
        assert kinds[0] == "ReplyStarted" and kinds[-1] == "ReplyDone"
        assert set(kinds[1:-1]) == {"ReplyDelta"}
    assert metrics.turns_total == 3
    assert "you said three" in engine.history_text(live.conversation)


async def test_client_cancel_stops_the_reply_and_the_next_turn_runs() -> None:
    long = " ".join(["word"] * 400)
    engine = ScriptedEngine(lambda t: long if t.text == "long" else "short reply", token_delay=0.01)
    rec = EventRecorder()
    live = make_live(engine, rec)
    try:
        await live.text("long")
        await live.text("next")
        await rec.until(count_at_least(ReplyDelta, 2))
        await live.cancel()
        await rec.until(count_at_least(ReplyDone, 1))
    finally:
        await live.close()
    cancelled = rec.of(ReplyCancelled)
    assert len(cancelled) == 1
    c = cancelled[0]
    assert isinstance(c, ReplyCancelled) and c.reason == "client" and c.reply_id == "r1"
    done = rec.of(ReplyDone)
    assert isinstance(done[0], ReplyDone) and done[0].reply_id == "r2"
    assert done[0].text == "short reply"
    # the cancelled reply kept only what was sent
    assert long not in engine.history_text(live.conversation)
    assert c.text in engine.history_text(live.conversation)


class BusyOnce(ScriptedEngine):
    """Refuses the first submitted turn with Busy."""

    refused = False

    def submit(
        self, conversation: Conversation, turn: TurnInput, max_new_tokens: int | None = None
    ) -> TurnHandle:
        if not self.refused:
            self.refused = True
            raise Busy("the engine is busy, try again")
        return super().submit(conversation, turn, max_new_tokens)


async def test_busy_engine_gives_busy_error_and_the_session_goes_on() -> None:
    engine = BusyOnce(echo, token_delay=0.001)
    rec = EventRecorder()
    live = make_live(engine, rec)
    try:
        await live.text("first")
        await live.text("second")
        await rec.until(count_at_least(ReplyDone, 1))
    finally:
        await live.close()
    errors = [e for e in rec.of(ErrorEvent) if isinstance(e, ErrorEvent)]
    assert [(e.code, e.reply_id) for e in errors] == [("busy", "r1")]
    done = rec.of(ReplyDone)
    assert isinstance(done[0], ReplyDone) and done[0].text == "you said second"


async def test_a_failing_turn_fails_alone() -> None:
    def reply(turn: TurnInput) -> str:
        if turn.text == "boom":
            raise RuntimeError("model exploded with secret text")
        return echo(turn)

    engine = ScriptedEngine(reply, token_delay=0.001)
    rec_a, rec_b = EventRecorder(), EventRecorder()
    a = make_live(engine, rec_a, sid="a")
    b = make_live(engine, rec_b, sid="b")
    try:
        await a.text("boom")
        await b.text("hello")
        await a.text("after")
        await rec_a.until(count_at_least(ReplyDone, 1))
        await rec_b.until(count_at_least(ReplyDone, 1))
    finally:
        await a.close()
        await b.close()
    errors = [e for e in rec_a.of(ErrorEvent) if isinstance(e, ErrorEvent)]
    assert len(errors) == 1 and errors[0].code == "internal" and errors[0].reply_id == "r1"
    assert "secret" not in errors[0].message
    done_a = rec_a.of(ReplyDone)
    assert isinstance(done_a[0], ReplyDone) and done_a[0].text == "you said after"
    done_b = rec_b.of(ReplyDone)
    assert isinstance(done_b[0], ReplyDone) and done_b[0].text == "you said hello"
    assert not rec_b.of(ErrorEvent)


async def test_close_cancels_turns_in_flight() -> None:
    engine = ScriptedEngine([" ".join(["slow"] * 1000)], token_delay=0.02)
    rec = EventRecorder()
    live = make_live(engine, rec)
    await live.text("one")
    await live.text("two")
    await rec.until(count_at_least(ReplyDelta, 1))
    await live.close()
    assert live.closed and live.replies_in_flight == 0
    sent = len(rec.events)
    await live.text("ignored after close")
    await asyncio.sleep(0.1)
    assert len(rec.events) == sent  # nothing is sent after close
    async with asyncio.timeout(10):  # the engine lets go of both turns
        while engine.runtime_stats().batch_size:
            await asyncio.sleep(0.01)
    await engine.close()


async def test_audio_utterance_reaches_the_engine(audio_dir: Path) -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    rec = EventRecorder()
    live = make_live(engine, rec)
    audio = decode(audio_dir / "ldc93s1-16k-mono.wav")
    try:
        for frame in frames(silence(0.5)):
            await live.feed_audio(frame)
        for frame in frames(audio):
            await live.feed_audio(frame)
        await live.feed_audio(float_to_pcm16(silence(1.5)))
        await rec.until(count_at_least(ReplyDone, 1))
    finally:
        await live.close()
    assert len(rec.of(SpeechStoppedEvent)) == 1
    assert len(engine.submitted) == 1
    conversation, turn = engine.submitted[0]
    assert conversation is live.conversation and turn.audio is not None


async def test_speculative_prefill_is_used_by_the_real_engine(
    tiny_model_dir: Path, audio_dir: Path
) -> None:
    # While the hangover runs the utterance is prefilled; the turn that the
    # close submits has the same samples, so the engine adopts that prefill.
    from voice_agent.engine.qwen2_audio import Qwen2AudioEngine

    engine = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=4)
    await engine.start()
    rec = EventRecorder()
    config = SessionConfig(vad=VadConfig(hangover_ms=600))  # the 0.3 s pause below stays open
    live = LiveSession(engine, rec, session_id="s1", config=config, max_new_tokens=4)
    audio = decode(audio_dir / "ldc93s1-16k-mono.wav")
    try:
        for frame in frames(silence(0.5)):
            await live.feed_audio(frame)
        for frame in frames(audio):
            await live.feed_audio(frame)
        for frame in frames(silence(0.3)):  # the pause: Speculate, then time to prefill
            await live.feed_audio(frame)
        await asyncio.sleep(0.5)
        await live.feed_audio(float_to_pcm16(silence(1.0)))
        await rec.until(count_at_least(ReplyDone, 1), timeout=40)
    finally:
        await live.close()
        await engine.close()
    assert (engine.stats["speculative_hits"], engine.stats["speculative_misses"]) == (1, 0)


def cut_sentence(audio_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """ldc93s1 cut at a quiet frame (940 ms): the first part, closed by its
    hangover, then the rest after a pause well inside the continuation window."""
    audio = decode(audio_dir / "ldc93s1-16k-mono.wav")
    cut = 940 * 16
    first = np.concatenate([silence(0.5), audio[:cut], silence(0.9)])
    return first, np.concatenate([audio[cut:], silence(1.0)])


@pytest.mark.parametrize("first_delta", [True, False], ids=["after-a-delta", "before-any"])
async def test_a_continued_sentence_is_one_turn_in_the_engine(
    audio_dir: Path, first_delta: bool
) -> None:
    # A typed turn first, then a sentence cut by a pause and resumed: the
    # engine ends with the typed turn and ONE audio turn (the whole span);
    # the reply to the first part is gone, whether or not it had begun.
    engine = ScriptedEngine(echo, token_delay=0.02)
    rec = EventRecorder()
    live = make_live(engine, rec)
    first, rest = cut_sentence(audio_dir)
    try:
        await live.text("hello")
        await rec.until_done(1)
        for frame in frames(first):
            await live.feed_audio(frame)
        if first_delta:
            await rec.until(
                lambda evs: any(isinstance(e, ReplyDelta) and e.reply_id == "r2" for e in evs)
            )
        for frame in frames(rest):
            await live.feed_audio(frame)
        await rec.until_done(2)
        await live.settled()
    finally:
        await live.close()
    assert ReplyCancelled("r2", "continued", rec.of(ReplyCancelled)[0].text) in rec.events
    stops = rec.of(SpeechStoppedEvent)
    assert [e.continues for e in stops] == [None, "u1"]
    assert [e.reply_id for e in rec.of(ReplyDone)] == ["r1", "r3"]
    history = engine.history_text(live.conversation)
    assert history.count("<|im_start|>user") == 2
    assert "you said hello" in history and history.count("heard some audio") == 1
    joined = engine.submitted[-1][1].audio
    assert joined is not None and len(joined) > len(first) // 2  # the whole span


async def test_a_continued_sentence_is_prefilled_joined_on_the_real_engine(
    tiny_model_dir: Path, audio_dir: Path
) -> None:
    # The first part's reply is taken back (its KV cropped away) and the
    # joined clip, prefilled during the second part's hangover, is adopted.
    from voice_agent.engine.qwen2_audio import Qwen2AudioEngine

    engine = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=4)
    await engine.start()
    edits: list[asyncio.Future[bool]] = []  # the take-back's DropTurns, to wait for
    edit_history = engine.edit_history

    def recorded_edit(conversation: Conversation, edit: HistoryEdit) -> asyncio.Future[bool]:
        edits.append(edit_history(conversation, edit))
        return edits[-1]

    engine.edit_history = recorded_edit  # type: ignore[method-assign]
    rec = EventRecorder()
    live = LiveSession(engine, rec, session_id="s1", config=SessionConfig(), max_new_tokens=4)
    first, rest = cut_sentence(audio_dir)
    end = (2780 - 940) * 16  # where ldc93s1's last word ends, in `rest`
    speech, after = rest[:end], rest[end:]
    try:
        for frame in frames(first):
            await live.feed_audio(frame)
        for frame in frames(speech):
            await live.feed_audio(frame)
        assert [e.reason for e in rec.of(ReplyCancelled)] == ["continued"]
        async with asyncio.timeout(30):  # the taken-back turn has settled in the engine
            while live.replies_in_flight:
                await asyncio.sleep(0.01)
        # ... and its DropTurns applied: one applied after the speculation began
        # would discard it (seen on a loaded machine: no hit, no miss)
        assert edits
        await asyncio.wait_for(asyncio.gather(*edits), 30)
        for frame in frames(after[: 16 * 200]):  # 200 ms: the pause, Speculate (joined)
            await live.feed_audio(frame)
        async with asyncio.timeout(30):
            while not engine.speculating(live.conversation):
                await asyncio.sleep(0.01)
        for frame in frames(after[16 * 200 :]):
            await live.feed_audio(frame)
        await rec.until(lambda evs: any(isinstance(e, ReplyDone) for e in evs), timeout=40)
        history = engine.snapshot(live.conversation)
    finally:
        await live.close()
        await engine.close()
    assert (engine.stats["speculative_hits"], engine.stats["speculative_misses"]) == (1, 0)
    assert history is not None and len(history.clips) == 1
    assert [m["role"] for m in history.messages if m["role"] != "system"] == ["user", "assistant"]
