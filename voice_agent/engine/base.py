"""The interface sessions use to talk to an inference engine.

A session opens a Conversation once, then submits one turn at a time:
new audio (16 kHz mono float32) and/or text. `submit` returns a TurnHandle at
once (or raises Busy); iterating it yields Delta pieces as tokens decode; when
iteration ends, `handle.result` holds the whole text, usage and timing.
`handle.cancel(keep_tokens)` stops generation within one decode step and keeps
only the first `keep_tokens` reply tokens in the conversation's history (None:
keep everything that was decoded). `edit_history` edits a conversation's
history between turns (drop the last turns, cut the last reply, append a
message), in order with its turns.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

from voice_agent.engine.types import (
    SAMPLE_RATE,
    AppendMessage,
    AudioArray,
    Conversation,
    Delta,
    DropTurns,
    EngineStats,
    History,
    HistoryEdit,
    Timing,
    TruncateReply,
    TurnInput,
    TurnResult,
    Usage,
)
from voice_agent.errors import EngineError

__all__ = [
    "SAMPLE_RATE",
    "AppendMessage",
    "AudioArray",
    "Conversation",
    "Delta",
    "DropTurns",
    "Engine",
    "EngineStats",
    "History",
    "HistoryEdit",
    "QueueTurnHandle",
    "Timing",
    "TruncateReply",
    "TurnHandle",
    "TurnInput",
    "TurnResult",
    "Usage",
    "edit_after",
    "edit_future",
    "resolve_threadsafe",
]


class TurnHandle(abc.ABC):
    """A submitted turn. Async-iterate it for Delta pieces."""

    @abc.abstractmethod
    def __aiter__(self) -> AsyncIterator[Delta]: ...

    @abc.abstractmethod
    def cancel(self, keep_tokens: int | None = None) -> None:
        """Stop generating within one decode step; safe to call more than once."""

    @property
    @abc.abstractmethod
    def result(self) -> TurnResult:
        """The finished turn; raises RuntimeError before iteration has ended."""


class Engine(abc.ABC):
    """One engine per process, shared by all sessions. Model code never runs on
    the event loop."""

    model_name: str = ""
    demo_model: bool = False

    @abc.abstractmethod
    async def start(self) -> None:
        """Start the worker (thread or process). Idempotent."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Cancel turns in flight and stop the worker."""

    @abc.abstractmethod
    def new_conversation(
        self, system_prompt: str | None = None, conversation_id: str | None = None
    ) -> Conversation: ...

    @abc.abstractmethod
    def submit(
        self, conversation: Conversation, turn: TurnInput, max_new_tokens: int | None = None
    ) -> TurnHandle:
        """Queue a turn. Raises errors.Busy when the queue is full. Turns of one
        conversation run in submission order: a turn submitted while an earlier
        one of the same conversation still runs (or is being cancelled) starts
        only after that one has finished and its history is settled."""

    @abc.abstractmethod
    def edit_history(self, conversation: Conversation, edit: HistoryEdit) -> asyncio.Future[bool]:
        """Edit the conversation's history (DropTurns, TruncateReply, AppendMessage;
        engine/types.py says what each does). Call it on the event loop.

        Queued at once, in order with the conversation's turns: it is applied
        after every turn of this conversation submitted before it has settled (a
        turn cancelled with keep_tokens first settles), and a turn submitted
        after it sees the edited history. The future resolves True once applied,
        False when there was nothing to apply it to (DropTurns beyond the first
        turn, TruncateReply when the last message is not an assistant reply or
        keep_tokens is beyond the reply): it never raises for that; it raises
        errors.EngineError only when the engine is closed (or closes before the
        edit is applied). Callers may ignore the future: an error in it is never
        reported as "exception never retrieved". It discards a speculative
        prefill of the conversation; it updates conversation.audio_clips,
        history_text() and what snapshot() returns, never conversation.turns
        (turns taken). It does not count against max_queue."""

    def release(self, conversation: Conversation) -> None:  # noqa: B027 (optional hook)
        """The conversation has no client now: free what can be rebuilt (its KV
        cache) and keep its history, so it can be resumed later."""

    def history_text(self, conversation: Conversation) -> str:
        """The conversation's ChatML history as text, for inspection and tests."""
        raise NotImplementedError

    def snapshot(self, conversation: Conversation) -> History | None:
        """Optional: a copy of the settled history, for storage; None when this
        engine cannot rebuild conversations, or not now (a turn of it is being
        settled: the next finished turn saves it)."""
        return None

    def restore(
        self, conversation_id: str, system_prompt: str | None, history: History
    ) -> Conversation:
        """Optional: a conversation rebuilt from a `snapshot` (its KV cache is
        rebuilt from the ids at its next turn)."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore conversations")

    def prefill_speculative(self, conversation: Conversation, audio: AudioArray) -> bool:
        """Optional: prefill `audio` as the next user turn ahead of time (during
        the VAD hangover). A later `submit` with exactly these samples and no
        text starts decoding at once. False: not supported or not queued."""
        return False

    def discard_speculative(self, conversation: Conversation) -> None:  # noqa: B027 (optional hook)
        """Optional: drop a speculative prefill (speech resumed)."""

    def runtime_stats(self) -> EngineStats:
        """Optional: the engine's load now (batch size, KV cache bytes, turns
        waiting). Called from the event loop at each /metrics scrape: must be
        cheap and must not block. Default: zeros (the engine cannot tell)."""
        return EngineStats()

    async def ready(self) -> bool:
        """Optional: whether the started engine answers now (its worker is
        alive and making progress, its backend reachable). /readyz calls it
        with a timeout of a few seconds. Default: True."""
        return True


def _retrieve(future: asyncio.Future[bool]) -> None:
    if not future.cancelled():
        future.exception()  # marks an error as retrieved: callers may ignore the future


def edit_future(loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[bool]:
    """A future for edit_history's answer whose error nobody has to retrieve."""
    future = (loop or asyncio.get_running_loop()).create_future()
    future.add_done_callback(_retrieve)
    return future


async def edit_after(
    previous: asyncio.Task[Any] | None, future: asyncio.Future[bool], apply: Callable[[], bool]
) -> None:
    """Run an edit in order: once the conversation's `previous` task has ended
    (however it ended), `apply` it and settle `future` with its answer; a
    cancel meanwhile (the engine closes) fails the future with EngineError."""
    try:
        if previous is not None:
            await asyncio.gather(previous, return_exceptions=True)
    except asyncio.CancelledError:
        if not future.done():
            future.set_exception(EngineError("the engine is closed"))
        raise
    applied = apply()
    if not future.done():
        future.set_result(applied)


def resolve_threadsafe(future: asyncio.Future[bool], outcome: bool | BaseException) -> None:
    """Settle an edit's future with a result or an error, from any thread (on
    its loop; nothing when the loop is gone or the future is done already)."""

    def settle() -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    try:
        loop = future.get_loop()
        if not loop.is_closed():
            loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop closed meanwhile: nobody waits
        pass


_Item = Delta | TurnResult | BaseException


def _deliver(pairs: list[tuple[QueueTurnHandle, _Item]]) -> None:
    for handle, item in pairs:
        handle._queue.put_nowait(item)


class QueueTurnHandle(TurnHandle):
    """A TurnHandle fed through an asyncio.Queue on the caller's loop.

    The producer (a worker thread or a task) calls `push` with Delta pieces and
    finally a TurnResult or an exception; `push` is safe from any thread.
    `cancel` records the request (read by the producer through
    `cancel_requested` and `keep_tokens`) and calls `on_cancel`, if given.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._result: TurnResult | None = None
        self._iterated = False
        self.cancel_requested = False
        self.keep_tokens: int | None = None
        self.on_cancel: Callable[[], None] | None = None

    def push(self, item: _Item) -> None:
        """Deliver a piece, the result or an error; callable from any thread."""
        try:
            if self._loop.is_closed():
                return
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the loop closed meanwhile: nobody is listening
            pass

    @staticmethod
    def push_all(items: list[tuple[QueueTurnHandle, _Item]]) -> None:
        """Deliver pieces to several handles with one wake-up per event loop
        (a batched decode step yields one piece per turn)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[QueueTurnHandle, _Item]]] = {}
        for handle, item in items:
            by_loop.setdefault(handle._loop, []).append((handle, item))
        for loop, pairs in by_loop.items():
            try:
                if not loop.is_closed():
                    loop.call_soon_threadsafe(_deliver, pairs)
            except RuntimeError:  # the loop closed meanwhile: nobody is listening
                pass

    async def _iterate(self) -> AsyncIterator[Delta]:
        if self._iterated:
            raise RuntimeError("a TurnHandle can be iterated only once")
        self._iterated = True
        while True:
            item = await self._queue.get()
            if isinstance(item, Delta):
                yield item
            elif isinstance(item, TurnResult):
                self._result = item
                return
            else:
                raise item

    def __aiter__(self) -> AsyncIterator[Delta]:
        return self._iterate()

    def cancel(self, keep_tokens: int | None = None) -> None:
        if self.cancel_requested:
            if keep_tokens is not None:
                self.keep_tokens = (
                    keep_tokens if self.keep_tokens is None else min(keep_tokens, self.keep_tokens)
                )
            return
        self.keep_tokens = None if keep_tokens is None else max(0, keep_tokens)
        self.cancel_requested = True
        if self.on_cancel is not None:
            self.on_cancel()

    @property
    def result(self) -> TurnResult:
        if self._result is None:
            raise RuntimeError("the turn has not finished: iterate the handle first")
        return self._result
