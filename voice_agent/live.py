"""LiveSession: the async driver of one sans-I/O Session, shared by every transport.

A transport (WebSocket, WebRTC, MQTT) owns the connection and calls
`feed_audio`, `text`, `commit`, `cancel` (MQTT: `turn`, then `settled` after
the reply) and finally `close`; the LiveSession runs the Session, executes the
actions it returns and hands every event to the transport's `send` callback:

    Send(event)        -> await send(event)
    SubmitTurn(...)    -> engine.submit(...); the handle joins the turn queue
    CancelTurn(...)    -> handle.cancel(keep_tokens)
    StopAudio(...)     -> stop_audio(reply_id), when the transport set it

Spoken replies: the transport that speaks replies reports their playback
with `playback(reply_id, playing)` (the Session asks longer speech for a
barge-in while the assistant is heard) and sets `stop_audio`, called when
speech barges in on the audio of a reply whose text is already done.

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

Home automation: `session_config` adds the `--devices` allowlist (and its
prompt text) to every session, so the Session follows a reply.done with
`command` events. When the session belongs to a named `device` and an
`on_command(device, command)` hook is given (hub.CommandBus.publish), each of
those commands also goes to the hook, after the client got its event.
`push_command` sends a command that came from elsewhere (MQTT) to the client,
in order with the session's other events. `add_close_callback` registers what
to undo when the session closes (the transport's hub.CommandBus subscription).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from voice_agent.commands import Command
from voice_agent.engine.base import Conversation, Engine, TurnHandle, TurnInput
from voice_agent.live_setup import prepare_turn_taking, session_config
from voice_agent.metrics import Metrics
from voice_agent.protocol import CommandEvent, ServerEvent
from voice_agent.session import (
    Action,
    CancelTurn,
    DetectTurn,
    EditHistory,
    Send,
    Session,
    SessionConfig,
    Speculate,
    StopAudio,
    SubmitTurn,
)
from voice_agent.turn import TurnBatcher

__all__ = ["LiveSession", "prepare_turn_taking", "session_config"]

logger = logging.getLogger("voice_agent.live")

SendFn = Callable[[ServerEvent], Awaitable[None]]
CommandHook = Callable[[str, Command], Awaitable[None]]


def _no_actions() -> list[Action]:
    return []


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
        device: str | None = None,
        on_command: CommandHook | None = None,
        transport: str = "realtime",
    ) -> None:
        self.session_id = session_id
        self.device = device
        self._on_command = on_command
        self._rejected_seen = 0
        self.engine = engine
        self.session = Session(
            session_id, config, sample_rate=sample_rate, channels=channels, ids_from=ids_from
        )
        # A resumed session brings its engine conversation (history) along.
        self.conversation: Conversation = conversation or engine.new_conversation(
            config.system_prompt, conversation_id=session_id
        )
        self.max_new_tokens = max_new_tokens
        # Server metrics (metrics.py): this session's events and turn results.
        self.metrics = metrics
        # A request/reply transport (MQTT) times its turns itself, request to reply.
        self._observer = (
            metrics.observer(transport=transport, turn_latency=transport == "realtime")
            if metrics is not None
            else None
        )
        self._send = send
        self._lock = asyncio.Lock()
        self._lock_users = 0  # coroutines holding or waiting for _lock
        self._handles: dict[str, TurnHandle] = {}
        self._turns: asyncio.Queue[_Turn] = asyncio.Queue()
        self._worker = asyncio.create_task(self._run_turns(), name=f"turns-{session_id}")
        self._closed = False
        self._on_close: list[Callable[[], None]] = []
        # Turn checks and fast-path frame actions running beside the input;
        # cancelled on close.
        self._tasks: set[asyncio.Task[None]] = set()
        # Spoken replies: stops a reply's audio (set by the transport that speaks).
        self.stop_audio: Callable[[str], None] | None = None

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

    def feed_audio_now(self, pcm: bytes) -> bool:
        """Feed a frame without yielding, for a synchronous caller (the
        WebSocket fast path). False, with nothing fed, while the lock is held
        or wanted: call `feed_audio` then, which keeps the order. Actions the
        frame causes run in a task that holds the lock, so input that comes
        after them waits for them."""
        if self._closed:
            return True
        if self._lock_users:
            return False
        actions = self.session.feed_audio(pcm)
        if actions:
            self._lock_users += 1  # before anything else can run: later input queues
            task = asyncio.get_running_loop().create_task(
                self._execute_locked(actions), name="frame-actions"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return True

    async def _execute_locked(self, actions: list[Action]) -> None:
        """Run a fast-path frame's actions under the lock (_lock_users was
        counted by the caller). A failure loses these actions only."""
        try:
            async with self._lock:
                await self._execute(actions)
                self._note_rejected()
        except Exception:
            logger.exception("frame actions failed", extra={"session_id": self.session_id})
        finally:
            self._lock_users -= 1

    async def text(self, text: str) -> None:
        await self._call(self.session.text, text)

    async def turn(self, turn: TurnInput) -> None:
        """A whole user turn at once (a request/reply transport: MQTT's clip
        and/or text); its reply comes as events like any other."""
        await self._call(self.session.turn, turn)

    async def settled(self) -> None:
        """Wait until the events of every call so far have been sent (a
        finished reply's command events follow its reply.done)."""
        await self._call(_no_actions)

    async def commit(self) -> None:
        await self._call(self.session.commit)

    async def cancel(self) -> None:
        await self._call(self.session.cancel)

    async def playback(self, reply_id: str, playing: bool) -> None:
        """The reply's spoken audio started (True) or finished (False) playing."""
        await self._call(self.session.playback, reply_id, playing)

    async def push_command(self, command: Command) -> None:
        """A command from elsewhere (MQTT, same device): send it to the client."""
        if self._closed:
            return
        event = CommandEvent(command.action, command.target, command.value)
        self._lock_users += 1
        try:
            async with self._lock:  # in order with the session's events; never forwarded back
                if not self._closed:
                    if self._observer is not None:
                        self._observer.observe(event)
                    await self._send(event)
        finally:
            self._lock_users -= 1

    def add_close_callback(self, callback: Callable[[], None]) -> None:
        """Call `callback` once when the session closes (at once if it has)."""
        if self._closed:
            callback()
        else:
            self._on_close.append(callback)

    async def end_of_stream(self) -> None:
        """The input ended (not the connection): close any open utterance."""
        await self._call(self.session.end_of_stream)

    async def close(self) -> None:
        """Cancel every turn in flight, stop the worker; idempotent. Nothing is
        sent after this."""
        if self._closed:
            return
        self._closed = True
        callbacks, self._on_close = self._on_close, []
        for callback in callbacks:
            try:
                callback()
            except Exception:
                logger.exception("close callback failed", extra={"session_id": self.session_id})
        for handle in list(self._handles.values()):
            handle.cancel()
        while not self._turns.empty():
            self._turns.get_nowait().handle.cancel()
        self._worker.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(self._worker, *self._tasks, return_exceptions=True)
        self._handles.clear()
        logger.debug("live session closed", extra={"session_id": self.session_id})

    # -- actions ----------------------------------------------------------

    async def _call(self, method: Callable[..., list[Action]], *args: Any) -> None:
        if self._closed:
            return
        actions: list[Action] | None = None
        if self._lock_users == 0:
            # Nobody holds or waits for the lock: call the Session now. Most
            # audio frames change nothing and are done here, without the
            # lock's cost (it is a large share of the server's CPU per frame
            # under many streams); with actions, the lock is still free and
            # is taken below without yielding, so nothing can come between.
            actions = method(*args)
            if not actions:
                # (no _note_rejected: commands are only rejected by actions)
                return
        self._lock_users += 1
        try:
            async with self._lock:
                if actions is None:
                    actions = method(*args)
                await self._execute(actions)
                self._note_rejected()
        finally:
            self._lock_users -= 1

    def _note_rejected(self) -> None:
        rejected = self.session.rejected_commands
        total = sum(rejected.values())
        if total == self._rejected_seen:
            return
        new, self._rejected_seen = total - self._rejected_seen, total
        if self._observer is not None:
            self._observer.rejected_commands(new)
        logger.warning(
            "invalid commands dropped",
            extra={
                "session_id": self.session_id,
                "device": self.device or "",
                "dropped": new,
                "reasons": ",".join(sorted(rejected)),
            },
        )

    async def _execute(self, actions: list[Action]) -> None:
        """Run actions in order (the lock is held); follow-ups run in place."""
        pending = deque(actions)
        while pending:
            action = pending.popleft()
            if isinstance(action, Send):
                if self._closed:
                    continue
                if self._observer is not None:
                    self._observer.observe(action.event)
                await self._send(action.event)
                if isinstance(action.event, CommandEvent):
                    await self._forward(action.event)
            elif isinstance(action, SubmitTurn):
                follow = self._submit(action)
                pending.extendleft(reversed(follow))
            elif isinstance(action, Speculate):
                if not self._closed:
                    self.engine.prefill_speculative(self.conversation, action.audio)
            elif isinstance(action, DetectTurn):
                if not self._closed:  # runs beside the audio; the answer comes back in order
                    task = asyncio.create_task(self._detect(action), name="turn-check")
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
            elif isinstance(action, CancelTurn):
                handle = self._handles.get(action.reply_id)
                if handle is not None:
                    handle.cancel(action.keep_tokens)
            elif isinstance(action, EditHistory):
                self._edit(action)
            elif isinstance(action, StopAudio):
                if self.stop_audio is not None:
                    self.stop_audio(action.reply_id)
                if action.reason == "barge_in" and self.metrics is not None:
                    self.metrics.barge_ins.inc()  # the text was done; its audio was cut
            else:  # pragma: no cover - a Session action this driver does not know
                logger.error(
                    "unknown session action %s",
                    type(action).__name__,
                    extra={"session_id": self.session_id},
                )

    def _edit(self, action: EditHistory) -> None:
        """Queue the edit in order with the turns submitted so far."""
        if self._closed:
            return
        try:
            self.engine.edit_history(self.conversation, action.edit)
        except NotImplementedError:
            logger.warning(
                "the engine cannot edit histories: %s not applied",
                type(action.edit).__name__,
                extra={"session_id": self.session_id},
            )

    async def _detect(self, action: DetectTurn) -> None:
        """Ask the shared, batched detector; feed the answer back to the Session."""
        detector = self.session.config.turn_detector
        probability = None
        if detector is not None:
            probability = await TurnBatcher.shared(detector).probability(action.audio)
        await self._call(
            self.session.on_turn_decision,
            action.utterance_id,
            action.check,
            probability,
            action.silence_ms,
        )

    async def _forward(self, event: CommandEvent) -> None:
        """A command the Session extracted: to the hook (MQTT), for a named device."""
        hook, device = self._on_command, self.device
        if hook is None or not device:
            return
        try:
            await hook(device, Command(event.action, event.target, event.value))
        except Exception:
            logger.exception(
                "command hook failed", extra={"session_id": self.session_id, "device": device}
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
        if self.metrics is not None:
            self.metrics.turn_result(result)
        await self._call(session.on_done, reply_id, result)
