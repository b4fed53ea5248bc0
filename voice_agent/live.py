"""LiveSession: the async driver of one sans-I/O Session, shared by every transport.

A transport (WebSocket, WebRTC, MQTT) owns the connection and calls
`feed_audio`, `text`, `commit`, `cancel` and finally `close`; the LiveSession
runs the Session, executes the actions it returns and hands every event to the
transport's `send` callback:

    Send(event)        -> await send(event)
    SubmitTurn(...)    -> engine.submit(...); the handle joins the turn queue
    CancelTurn(...)    -> handle.cancel(keep_tokens)

Ordering: every Session call and the sends it produced run under one lock, so
events leave in exactly the order the Session emitted them, and a slow client
slows only its own session (the transport stops reading from it). One worker
task consumes the submitted turns strictly in submission order, feeding
`on_delta` / `on_done` / `on_failed` back into the Session. A turn refused by
the engine (errors.Busy) or failing in it reaches the Session as `on_failed`,
which tells the client; nothing a turn does can take another session down.

The turn queue is bounded by the Session itself (at most one running reply plus
`max_queued_utterances` waiting) and by the engine's own queue (Busy).

`send` must not raise when the peer has gone away (the transport notices the
closed connection itself and calls `close`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from voice_agent.config import Config
from voice_agent.engine.base import Conversation, Engine, TurnHandle
from voice_agent.protocol import (
    ErrorEvent,
    ReplyCancelled,
    ReplyDone,
    ServerEvent,
    SpeechStoppedEvent,
)
from voice_agent.session import Action, CancelTurn, Send, Session, SessionConfig, SubmitTurn
from voice_agent.vad import VadConfig

logger = logging.getLogger("voice_agent.live")

SendFn = Callable[[ServerEvent], Awaitable[None]]


def session_config(config: Config, system_prompt: str | None = None) -> SessionConfig:
    """The Session settings of the server config; `system_prompt` (from
    session.start) overrides the server's default."""
    return SessionConfig(
        vad=VadConfig(
            aggressiveness=config.vad_aggressiveness,
            preroll_ms=config.preroll_ms,
            hangover_ms=config.hangover_ms,
            min_speech_ms=config.min_speech_ms,
            max_utterance_ms=config.max_utterance_ms,
        ),
        barge_in_ms=config.barge_in_ms,
        max_queued_utterances=config.max_queued_utterances,
        max_text_chars=config.max_text_chars,
        system_prompt=system_prompt if system_prompt is not None else config.system_prompt,
    )


@dataclass
class Metrics:
    """Process-wide counters, fed with every event sent to a client.

    Kept deliberately small; rendered in the Prometheus text format.
    """

    sessions_active: int = 0
    sessions_total: int = 0
    utterances_total: int = 0
    turns_total: int = 0
    barge_ins_total: int = 0
    errors_total: int = 0

    def observe(self, event: ServerEvent) -> None:
        if isinstance(event, SpeechStoppedEvent):
            self.utterances_total += 1
        elif isinstance(event, ReplyDone):
            self.turns_total += 1
        elif isinstance(event, ReplyCancelled):
            self.turns_total += 1
            if event.reason == "barge_in":
                self.barge_ins_total += 1
        elif isinstance(event, ErrorEvent):
            self.errors_total += 1

    def render(self) -> str:
        rows = (
            ("sessions_active", "gauge", "sessions open now", self.sessions_active),
            ("sessions_total", "counter", "sessions started", self.sessions_total),
            ("utterances_total", "counter", "utterances closed by the VAD", self.utterances_total),
            ("turns_total", "counter", "replies finished or cancelled", self.turns_total),
            ("barge_ins_total", "counter", "replies cancelled by barge-in", self.barge_ins_total),
            ("errors_total", "counter", "error events sent to clients", self.errors_total),
        )
        lines: list[str] = []
        for name, kind, help_text, value in rows:
            full = f"voice_agent_{name}"
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {value}"]
        return "\n".join(lines) + "\n"


@dataclass
class _Turn:
    reply_id: str
    handle: TurnHandle


class LiveSession:
    """Drives one Session against the shared engine; see the module doc.

    Create it inside the running event loop (it starts its turn worker task);
    the engine conversation's id is the session id.
    """

    def __init__(
        self,
        engine: Engine,
        send: SendFn,
        *,
        session_id: str,
        config: SessionConfig,
        sample_rate: int = 16000,
        channels: int = 1,
        max_new_tokens: int | None = None,
        metrics: Metrics | None = None,
        conversation: Conversation | None = None,
        ids_from: tuple[int, int] = (0, 0),
    ) -> None:
        self.session_id = session_id
        self.engine = engine
        self.session = Session(
            session_id, config, sample_rate=sample_rate, channels=channels, ids_from=ids_from
        )
        # A resumed session brings its engine conversation (history) along.
        self.conversation: Conversation = conversation or engine.new_conversation(
            config.system_prompt, conversation_id=session_id
        )
        self.max_new_tokens = max_new_tokens
        self.metrics = metrics
        self._send = send
        self._lock = asyncio.Lock()
        self._handles: dict[str, TurnHandle] = {}
        self._turns: asyncio.Queue[_Turn] = asyncio.Queue()
        self._worker = asyncio.create_task(self._run_turns(), name=f"turns-{session_id}")
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def replies_in_flight(self) -> int:
        """Turns submitted to the engine and not finished yet."""
        return len(self._handles)

    # -- inputs (called by the transport) ---------------------------------

    async def feed_audio(self, pcm: bytes) -> None:
        """Interleaved PCM16 at the session's rate; BadAudio on an odd length."""
        await self._call(self.session.feed_audio, pcm)

    async def text(self, text: str) -> None:
        await self._call(self.session.text, text)

    async def commit(self) -> None:
        await self._call(self.session.commit)

    async def cancel(self) -> None:
        await self._call(self.session.cancel)

    async def end_of_stream(self) -> None:
        """The input ended (not the connection): close any open utterance."""
        await self._call(self.session.end_of_stream)

    async def close(self) -> None:
        """Cancel every turn in flight, stop the worker; idempotent. Nothing is
        sent after this."""
        if self._closed:
            return
        self._closed = True
        for handle in list(self._handles.values()):
            handle.cancel()
        while not self._turns.empty():
            self._turns.get_nowait().handle.cancel()
        self._worker.cancel()
        await asyncio.gather(self._worker, return_exceptions=True)
        self._handles.clear()
        logger.debug("live session closed", extra={"session_id": self.session_id})

    # -- actions ----------------------------------------------------------

    async def _call(self, method: Callable[..., list[Action]], *args: Any) -> None:
        if self._closed:
            return
        async with self._lock:
            await self._execute(method(*args))

    async def _execute(self, actions: list[Action]) -> None:
        """Run actions in order (the lock is held); follow-ups run in place."""
        pending = deque(actions)
        while pending:
            action = pending.popleft()
            if isinstance(action, Send):
                if self._closed:
                    continue
                if self.metrics is not None:
                    self.metrics.observe(action.event)
                await self._send(action.event)
            elif isinstance(action, SubmitTurn):
                follow = self._submit(action)
                pending.extendleft(reversed(follow))
            elif isinstance(action, CancelTurn):
                handle = self._handles.get(action.reply_id)
                if handle is not None:
                    handle.cancel(action.keep_tokens)
            else:  # pragma: no cover - a Session action this driver does not know
                logger.error(
                    "unknown session action %s",
                    type(action).__name__,
                    extra={"session_id": self.session_id},
                )

    def _submit(self, action: SubmitTurn) -> list[Action]:
        if self._closed:
            return []
        try:
            handle = self.engine.submit(self.conversation, action.turn, self.max_new_tokens)
        except Exception as exc:
            logger.warning(
                "turn refused by the engine: %s",
                type(exc).__name__,
                extra={"session_id": self.session_id},
            )
            return list(self.session.on_failed(action.reply_id, exc))
        self._handles[action.reply_id] = handle
        self._turns.put_nowait(_Turn(action.reply_id, handle))
        return []

    # -- the turn worker --------------------------------------------------

    async def _run_turns(self) -> None:
        while True:
            turn = await self._turns.get()
            try:
                await self._run_turn(turn)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug in the Session or a send failure: this turn is lost,
                # the session and every other one go on.
                logger.exception(
                    "turn driver failed",
                    extra={"session_id": self.session_id, "reply_id": turn.reply_id},
                )
            finally:
                self._handles.pop(turn.reply_id, None)

    async def _run_turn(self, turn: _Turn) -> None:
        session = self.session
        reply_id = turn.reply_id
        try:
            async for delta in turn.handle:
                await self._call(session.on_delta, reply_id, delta)
            result = turn.handle.result
        except asyncio.CancelledError:
            turn.handle.cancel()
            raise
        except Exception as exc:
            logger.warning(
                "turn failed: %s",
                type(exc).__name__,
                extra={"session_id": self.session_id, "reply_id": reply_id},
            )
            self._handles.pop(reply_id, None)
            await self._call(session.on_failed, reply_id, exc)
            return
        self._handles.pop(reply_id, None)
        await self._call(session.on_done, reply_id, result)
