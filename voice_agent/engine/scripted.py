"""An engine that replies with scripted text, word by word (pure asyncio).

For tests of what sessions and transports do with a reply (command parsing,
cancellation, barge-in): no model, no torch. Each word (with its leading
whitespace) is one token; a token is delivered every `token_delay` seconds
through the injected `sleep`. History edits (edit_history) run in order with
the conversation's turns, as in the real engines. Every path it stands in for is also tested with
the real Qwen2-Audio classes on the tiny model.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from voice_agent.engine import defaults, edits, prompt
from voice_agent.engine.base import (
    AppendMessage,
    Conversation,
    Delta,
    DropTurns,
    Engine,
    EngineStats,
    History,
    HistoryEdit,
    QueueTurnHandle,
    Timing,
    TruncateReply,
    TurnHandle,
    TurnInput,
    TurnResult,
    Usage,
    edit_after,
    edit_future,
)
from voice_agent.errors import Busy, EngineError

Replies = list[str] | Callable[[TurnInput], str]
_WORD = re.compile(r"\s*\S+")


def words(text: str) -> list[str]:
    """The scripted engine's tokens: words with their leading whitespace."""
    return _WORD.findall(text)


def _chatml(message: dict[str, Any]) -> str:
    """One message as history_text shows it (an audio item: "<audio>")."""
    content = message.get("content")
    if isinstance(content, list):
        body = "".join(
            "<audio>" if p.get("type") == "audio" else str(p.get("text", "")) for p in content
        )
    else:
        body = str(content or "")
    return f"<|im_start|>{message.get('role', '')}\n{body}<|im_end|>\n"


@dataclass
class _ScriptState:
    messages: list[dict[str, Any]] = field(default_factory=list)
    last: asyncio.Task[Any] | None = None  # the conversation's last turn or edit
    turn_log: edits.TurnLog = field(default_factory=edits.TurnLog)


class ScriptedEngine(Engine):
    """Replies from a list (used in order, the last one repeating) or a callable.

    A callable that raises makes that turn fail with EngineError, as a model
    failure would. `submitted` records every (conversation, turn) accepted.
    """

    def __init__(
        self,
        replies: Replies | None = None,
        *,
        token_delay: float = 0.005,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        max_queue: int = defaults.MAX_QUEUE,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.model_name = "scripted"
        self.replies: Replies = replies if replies is not None else ["OK."]
        self.token_delay = token_delay
        self.max_queue = max_queue
        self.submitted: list[tuple[Conversation, TurnInput]] = []
        self._sleep = sleep
        self._clock = clock
        self._reply_index = 0
        self._unfinished = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self.started = False
        self.closed = False
        self.edits: list[tuple[Conversation, HistoryEdit]] = []  # every edit queued

    async def start(self) -> None:
        self.started = True
        self.closed = False

    async def close(self) -> None:
        self.closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.started = False

    def runtime_stats(self) -> EngineStats:
        """Turns submitted and not finished count as the batch; no KV cache."""
        return EngineStats(batch_size=self._unfinished)

    async def ready(self) -> bool:
        return self.started

    def new_conversation(
        self, system_prompt: str | None = None, conversation_id: str | None = None
    ) -> Conversation:
        cid = conversation_id or f"scripted-{next(self._ids)}"
        return Conversation(cid, system_prompt, state=_ScriptState())

    def _next_reply(self, turn: TurnInput) -> str:
        if callable(self.replies):
            return self.replies(turn)
        if not self.replies:
            return ""
        i = min(self._reply_index, len(self.replies) - 1)
        self._reply_index += 1
        return self.replies[i]

    def submit(
        self, conversation: Conversation, turn: TurnInput, max_new_tokens: int | None = None
    ) -> TurnHandle:
        state = conversation.state
        if not isinstance(state, _ScriptState):
            raise ValueError("conversation was not created by this engine")
        if self._unfinished >= self.max_queue:
            raise Busy("the engine is busy, try again")
        self._unfinished += 1
        self.submitted.append((conversation, turn))
        handle = QueueTurnHandle(asyncio.get_running_loop())
        previous = state.last
        seq = state.turn_log.submit()
        task = asyncio.create_task(
            self._run(conversation, state, turn, handle, previous, max_new_tokens, seq)
        )
        state.last = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    async def _run(
        self,
        conversation: Conversation,
        state: _ScriptState,
        turn: TurnInput,
        handle: QueueTurnHandle,
        previous: asyncio.Task[None] | None,
        max_new_tokens: int | None,
        seq: int,
    ) -> None:
        submitted = self._clock()
        entered = False  # whether the turn entered the history
        try:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            started = self._clock()
            first = 0.0
            if handle.cancel_requested:
                handle.push(TurnResult("", Usage(), Timing(), cancelled=True))
                return
            try:
                tokens = words(self._next_reply(turn))
            except Exception:
                handle.push(EngineError("the model failed on this turn"))
                return
            if max_new_tokens is not None:
                tokens = tokens[:max_new_tokens]
            produced = 0
            for piece in tokens:
                if handle.cancel_requested:
                    break
                await self._sleep(self.token_delay)
                if handle.cancel_requested:
                    break
                produced += 1
                if not first:
                    first = self._clock()
                handle.push(Delta(piece, produced))
            cancelled = handle.cancel_requested
            keep = produced
            if cancelled and handle.keep_tokens is not None:
                keep = min(produced, handle.keep_tokens)
            text = "".join(tokens[:keep])
            clips = 0 if turn.audio is None else 1  # scripted: one clip per audio turn
            state.messages += [
                prompt.user_message(conversation.audio_clips, clips, turn.text),
                {"role": "assistant", "content": text},
            ]
            conversation.turns += 1
            if turn.audio is not None:
                conversation.audio_clips += 1
            entered = True
            now = self._clock()
            handle.push(
                TurnResult(
                    text,
                    Usage(prompt_tokens=0, cached_tokens=0, completion_tokens=produced),
                    Timing(
                        queue_ms=(started - submitted) * 1000.0,
                        ttft_ms=((first or now) - submitted) * 1000.0,
                        total_ms=(now - submitted) * 1000.0,
                    ),
                    cancelled=cancelled,
                )
            )
        except asyncio.CancelledError:
            handle.push(TurnResult("", Usage(), Timing(), cancelled=True))
            raise
        finally:
            self._unfinished -= 1
            state.turn_log.note(seq, entered)

    def snapshot(self, conversation: Conversation) -> History | None:
        state = conversation.state
        if not isinstance(state, _ScriptState):
            raise ValueError("conversation was not created by this engine")
        return History(messages=[dict(m) for m in state.messages], turns=conversation.turns)

    def restore(
        self, conversation_id: str, system_prompt: str | None, history: History
    ) -> Conversation:
        conversation = self.new_conversation(system_prompt, conversation_id)
        state = conversation.state
        assert isinstance(state, _ScriptState)
        state.messages = [dict(m) for m in history.messages]
        conversation.turns = history.turns
        conversation.audio_clips = sum(edits.audio_items(m) for m in state.messages)
        return conversation

    def edit_history(self, conversation: Conversation, edit: HistoryEdit) -> asyncio.Future[bool]:
        state = conversation.state
        if not isinstance(state, _ScriptState):
            raise ValueError("conversation was not created by this engine")
        future = edit_future()
        if self.closed:
            future.set_exception(EngineError("the engine is closed"))
            return future
        self.edits.append((conversation, edit))
        upto = state.turn_log.submitted
        task = asyncio.create_task(
            edit_after(state.last, future, partial(_apply, conversation, state, edit, upto))
        )
        state.last = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    def history_text(self, conversation: Conversation) -> str:
        state = conversation.state
        if not isinstance(state, _ScriptState):
            raise ValueError("conversation was not created by this engine")
        system = conversation.system_prompt or "You are a helpful assistant."
        return f"<|im_start|>system\n{system}<|im_end|>\n" + "".join(
            _chatml(m) for m in state.messages
        )


def _apply(conversation: Conversation, state: _ScriptState, edit: HistoryEdit, upto: int) -> bool:
    """Apply an edit to the settled history (`upto`: turns submitted before
    it); False: nothing to apply it to."""
    messages = state.messages
    if isinstance(edit, DropTurns):
        cut = edits.dropped(messages, edit, state.turn_log, upto)
        if cut is None:
            return False
        del messages[cut.index :]
        conversation.audio_clips = max(0, conversation.audio_clips - cut.clips)
        return True
    if isinstance(edit, TruncateReply):
        reply = edits.last_reply(messages)
        if reply is None:
            return False
        tokens = words(edits.message_text(reply))
        if edit.keep_tokens > len(tokens):
            return False
        messages[-1] = {"role": "assistant", "content": "".join(tokens[: edit.keep_tokens])}
        return True
    assert isinstance(edit, AppendMessage)
    messages.append(edits.text_message(edit))
    return True
