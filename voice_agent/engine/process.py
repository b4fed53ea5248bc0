"""The model in a separate worker process (`--engine-process`).

A crash in model code (a segfault, an abort, the OOM killer) then takes down
only the worker: the turns in flight fail with EngineError (error `internal`),
a fresh worker is spawned, and every conversation goes on. The parent keeps
each conversation's settled history (token ids, messages, clips) and hands it
to the new worker with the conversation's next turn; the worker rebuilds the
KV cache from it. History edits go to the worker in order with the turns; its
answer carries the edited history for the parent's copy (an edit pending when
the worker dies fails with EngineError, as the turns in flight do).

Parent and worker talk over one multiprocessing Pipe (spawn context): the
worker runs a Qwen2AudioEngine on its own event loop and streams Delta pieces
and results back; a reader thread in the parent feeds them to the handles.
Every `STATS_INTERVAL` seconds the worker also sends its engine's
`runtime_stats` and health, which `runtime_stats()` and `ready()` report (so a
/metrics scrape or a /readyz probe never waits on the worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import multiprocessing as mp
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from voice_agent.engine import defaults
from voice_agent.engine.base import (
    AudioArray,
    Conversation,
    Delta,
    Engine,
    EngineStats,
    History,
    HistoryEdit,
    QueueTurnHandle,
    Timing,
    TurnHandle,
    TurnInput,
    TurnResult,
    Usage,
    edit_future,
    resolve_threadsafe,
)
from voice_agent.engine.edits import TurnLog
from voice_agent.engine.process_worker import FAILED, STATS_INTERVAL, child_main
from voice_agent.errors import Busy, EngineError, ModelLoadError

__all__ = ["STATS_INTERVAL", "ProcessEngine"]

logger = logging.getLogger("voice_agent.engine")

STATS_STALE = 5.0  # a worker silent for this long is not ready (5 missed reports)


@dataclass
class _Mirror:
    """The parent's copy of a conversation's settled history."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    clips: list[AudioArray] = field(default_factory=list)
    clip_starts: list[int] = field(default_factory=list)
    generation: int = -1  # the worker generation that knows this conversation
    forget: bool = False  # released: the worker forgets it once nothing of it is in flight
    # Numbered as the worker numbers them; handed to a new worker with the history.
    turn_log: TurnLog = field(default_factory=TurnLog)


@dataclass
class _InFlight:
    conversation: Conversation
    handle: QueueTurnHandle
    turn: TurnInput
    seq: int  # its number in the conversation's turn_log


@dataclass
class _Editing:
    conversation: Conversation
    future: asyncio.Future[bool]


class ProcessEngine(Engine):
    """A Qwen2AudioEngine in a child process, restarted when it dies."""

    def __init__(self, model: str, **engine_kwargs: Any) -> None:
        self.model_name = model
        self.demo_model = bool(engine_kwargs.get("demo_model", False))
        self.max_queue = int(engine_kwargs.get("max_queue", defaults.MAX_QUEUE))
        self._kwargs = engine_kwargs
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None
        self._lock = threading.RLock()
        self._send_lock = threading.Lock()
        self._generation = 0
        self._turns: dict[int, _InFlight] = {}
        self._edits: dict[int, _Editing] = {}
        self._tids = itertools.count(1)
        self._cids = itertools.count(1)
        self._reader: threading.Thread | None = None
        self._closed = False
        self._tokenizer: Any = None
        self.restarts = 0
        self.info: dict[str, Any] = {}
        # The worker's last stats report: figures, health, when it came.
        self._stats = EngineStats()
        self.worker_conversations = 0  # held by the worker, from its last stats report
        self._healthy = False
        self._stats_at = 0.0

    # ------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else int(self._proc.pid)

    def load(self) -> None:
        """Spawn the worker and wait until its model is loaded (blocking)."""
        with self._lock:
            if self._proc is not None and self._proc.is_alive():
                return
            self._spawn()

    def _spawn(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(
            target=child_main,
            args=(child, self.model_name, self._kwargs),
            name="voice-agent-engine",
            daemon=True,
        )
        proc.start()
        child.close()
        try:
            kind, payload = parent.recv()
        except (EOFError, OSError):
            proc.join(5)
            raise ModelLoadError(
                f"the engine process for {self.model_name!r} exited while loading"
            ) from None
        if kind != "ready":
            proc.join(5)
            raise ModelLoadError(str(payload))
        self.info = dict(payload)
        self.demo_model = bool(payload.get("demo_model", self.demo_model))
        self._proc, self._conn = proc, parent
        self._generation += 1

    async def start(self) -> None:
        self._closed = False
        await asyncio.to_thread(self.load)
        with self._lock:
            if self._reader is None or not self._reader.is_alive():
                self._reader = threading.Thread(
                    target=self._read_loop, name="voice-agent-engine-reader", daemon=True
                )
                self._reader.start()

    async def close(self) -> None:
        self._closed = True
        with self._lock:
            proc, conn = self._proc, self._conn
        if proc is None or conn is None:
            return
        self._send_quiet(("stop",))
        await asyncio.to_thread(proc.join, 30)
        if proc.is_alive():
            proc.kill()
            await asyncio.to_thread(proc.join, 5)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)
        self._fail_in_flight("the engine is closed")
        with self._lock:
            self._proc, self._conn = None, None

    def _send(self, msg: tuple[Any, ...]) -> None:
        conn = self._conn
        if conn is None:
            raise EngineError("the engine is not started")
        try:
            with self._send_lock:
                conn.send(msg)
        except (OSError, ValueError):  # the worker died: the reader restarts it
            raise EngineError(FAILED) from None

    def _send_quiet(self, msg: tuple[Any, ...]) -> None:
        """Send if the worker is there (best effort: cancel, release, discard)."""
        with contextlib.suppress(EngineError):
            self._send(msg)

    def _read_loop(self) -> None:
        while not self._closed:
            conn, proc = self._conn, self._proc
            if conn is None or proc is None:
                return
            try:
                if not conn.poll(0.2):
                    if proc.is_alive():
                        continue
                    raise EOFError
                msg = conn.recv()
            except (EOFError, OSError):
                if self._closed:
                    return
                self._restart()
                continue
            self._dispatch(msg)

    def _restart(self) -> None:
        logger.error("the engine process died; failing the turns in flight and restarting it")
        with self._lock:
            self._conn = None  # submit() answers busy until the new worker is ready
            self._fail_in_flight(FAILED)
            if self._proc is not None:
                self._proc.join(1)
            while not self._closed:
                try:
                    self._spawn()
                    break
                except ModelLoadError:
                    logger.exception("could not restart the engine process; trying again")
            self.restarts += 1

    def _fail_in_flight(self, message: str) -> None:
        with self._lock:
            turns, self._turns = list(self._turns.values()), {}
            edits, self._edits = list(self._edits.values()), {}
        for f in turns:
            _log(f, entered=False)
            f.handle.push(EngineError(message))
        for e in edits:
            resolve_threadsafe(e.future, EngineError(message))

    def _dispatch(self, msg: tuple[Any, ...]) -> None:
        kind, tid = msg[0], msg[1]
        if kind == "stats":
            _, _, batch_size, kv_bytes, queued, healthy, conversations = msg
            self._stats = EngineStats(batch_size, kv_bytes, queued)
            self.worker_conversations = conversations
            self._healthy = bool(healthy)
            self._stats_at = time.monotonic()
            return
        if kind in ("edited", "edit_failed"):
            with self._lock:
                e = self._edits.pop(tid, None)
            if e is None:
                return
            if kind == "edit_failed":
                resolve_threadsafe(e.future, EngineError(msg[2]))
                return
            self._mirror_edit(e.conversation, msg[3])
            with self._lock:
                self._forget_if_idle(e.conversation)
            resolve_threadsafe(e.future, bool(msg[2]))
            return
        f = self._turns.get(tid)
        if f is None:
            return
        if kind == "delta":
            f.handle.push(Delta(msg[2], msg[3]))
            return
        with self._lock:
            self._turns.pop(tid, None)
        if kind == "error":
            _log(f, entered=False)
            with self._lock:
                self._forget_if_idle(f.conversation)
            f.handle.push(EngineError(msg[2]))
            return
        text, usage, timing, cancelled, snapshot = msg[2:]
        if snapshot is not None:
            self._settle(f, snapshot)
        with self._lock:
            self._forget_if_idle(f.conversation)
        f.handle.push(TurnResult(text, Usage(**usage), Timing(**timing), cancelled=cancelled))

    def _settle(self, f: _InFlight, snapshot: dict[str, Any]) -> None:
        from voice_agent.engine.qwen2_audio import split_clips

        m = f.conversation.state
        assert isinstance(m, _Mirror)
        new_clips = snapshot["clips"] - len(m.clips)
        if new_clips > 0 and f.turn.audio is not None:
            m.clips.extend(split_clips(f.turn.audio)[:new_clips])
        m.messages = snapshot["messages"]
        m.ids = snapshot["ids"]
        m.clip_starts = snapshot["clip_starts"]
        m.turn_log.merge(snapshot["log"])
        f.conversation.turns = snapshot["turns"]
        f.conversation.audio_clips = len(m.clips)

    @staticmethod
    def _mirror_edit(conversation: Conversation, snapshot: dict[str, Any]) -> None:
        """The worker's history after an edit: the clips it dropped go (a later
        turn's "done" brings the samples of clips added meanwhile)."""
        m = conversation.state
        assert isinstance(m, _Mirror)
        m.clips = m.clips[: snapshot["clips"]]
        m.messages = snapshot["messages"]
        m.ids = snapshot["ids"]
        m.clip_starts = snapshot["clip_starts"]
        m.turn_log.merge(snapshot["log"])
        conversation.turns = snapshot["turns"]
        conversation.audio_clips = len(m.clips)

    def _fresh(self) -> bool:
        return time.monotonic() - self._stats_at < STATS_STALE

    def runtime_stats(self) -> EngineStats:
        """The worker's last report (at most STATS_INTERVAL old); zeros when
        it has not reported lately (restarting)."""
        return self._stats if self._fresh() and not self._closed else EngineStats()

    async def ready(self) -> bool:
        """The worker process is alive, connected, and its last report (fresh)
        said its engine is healthy."""
        proc = self._proc
        return (
            not self._closed
            and proc is not None
            and proc.is_alive()
            and self._conn is not None
            and self._healthy
            and self._fresh()
        )

    # ------------------------------------------------------------- sessions

    def new_conversation(
        self, system_prompt: str | None = None, conversation_id: str | None = None
    ) -> Conversation:
        cid = conversation_id or f"conv-{next(self._cids)}"
        m = _Mirror()
        if system_prompt is not None:
            m.messages.append({"role": "system", "content": system_prompt})
        return Conversation(cid, system_prompt, state=m)

    def _sync(self, conversation: Conversation) -> None:
        """Make sure the current worker knows the conversation (with its history)."""
        m = conversation.state
        if not isinstance(m, _Mirror):
            raise ValueError("conversation was not created by this engine")
        m.forget = False  # in use again
        if m.generation != self._generation:
            snapshot = {
                "messages": m.messages,
                "ids": m.ids,
                "clips": m.clips,
                "clip_starts": m.clip_starts,
                "turns": conversation.turns,
                "log": m.turn_log,
            }
            self._send(("open", conversation.conversation_id, conversation.system_prompt, snapshot))
            m.generation = self._generation

    def submit(
        self, conversation: Conversation, turn: TurnInput, max_new_tokens: int | None = None
    ) -> TurnHandle:
        if self._closed or self._proc is None:
            raise EngineError("the engine is not started")
        handle = QueueTurnHandle(asyncio.get_running_loop())
        if self._conn is None:
            raise Busy("the engine is restarting, try again")
        with self._lock:
            if len(self._turns) >= self.max_queue:
                raise Busy("the engine is busy, try again")
            self._sync(conversation)
            tid = next(self._tids)
            m = conversation.state
            assert isinstance(m, _Mirror)  # _sync checked it
            log = m.turn_log
            self._turns[tid] = _InFlight(conversation, handle, turn, log.submit())
            audio = None if turn.audio is None else np.asarray(turn.audio, dtype=np.float32)
            try:
                self._send(
                    ("turn", tid, conversation.conversation_id, audio, turn.text, max_new_tokens)
                )
            except EngineError:
                self._turns.pop(tid, None)
                log.submitted -= 1  # the worker never saw it
                raise

        def on_cancel() -> None:
            self._send_quiet(("cancel", tid, handle.keep_tokens))

        handle.on_cancel = on_cancel
        return handle

    def edit_history(self, conversation: Conversation, edit: HistoryEdit) -> asyncio.Future[bool]:
        future = edit_future()
        if self._closed or self._proc is None:
            future.set_exception(EngineError("the engine is closed"))
            return future
        try:
            with self._lock:
                self._sync(conversation)
                eid = next(self._tids)
                self._edits[eid] = _Editing(conversation, future)
                try:
                    self._send(("edit", eid, conversation.conversation_id, edit))
                except EngineError:
                    self._edits.pop(eid, None)
                    raise
        except EngineError as exc:  # the worker is restarting
            future.set_exception(exc)
        return future

    def release(self, conversation: Conversation) -> None:
        """Drop its KV cache now; the worker forgets the conversation (its
        clips, ids) once none of its turns or edits is in flight, and a later
        use opens it there again from the settled history, as after a restart."""
        m = conversation.state
        if not isinstance(m, _Mirror) or m.generation != self._generation:
            return
        with self._lock:
            m.forget = True
            if self._forget_if_idle(conversation):
                return
        self._send_quiet(("release", conversation.conversation_id))

    def _forget_if_idle(self, conversation: Conversation) -> bool:
        """Under the lock: tell the worker to forget a released conversation
        with nothing in flight (True when it was told)."""
        m = conversation.state
        if not isinstance(m, _Mirror) or not m.forget or m.generation != self._generation:
            return False
        if any(f.conversation is conversation for f in self._turns.values()) or any(
            e.conversation is conversation for e in self._edits.values()
        ):
            return False
        m.forget = False
        m.generation = -1  # the next use opens it again
        self._send_quiet(("forget", conversation.conversation_id))
        return True

    def prefill_speculative(self, conversation: Conversation, audio: AudioArray) -> bool:
        try:
            with self._lock:
                self._sync(conversation)
                self._send(("spec", conversation.conversation_id, np.asarray(audio, np.float32)))
        except EngineError:
            return False
        return True

    def discard_speculative(self, conversation: Conversation) -> None:
        m = conversation.state
        if isinstance(m, _Mirror) and m.generation == self._generation:
            self._send_quiet(("discard", conversation.conversation_id))

    def snapshot(self, conversation: Conversation) -> History | None:
        m = conversation.state
        if not isinstance(m, _Mirror):
            raise ValueError("conversation was not created by this engine")
        return History.of(m, conversation.turns)

    def restore(
        self, conversation_id: str, system_prompt: str | None, history: History
    ) -> Conversation:
        conversation = self.new_conversation(system_prompt, conversation_id)
        assert isinstance(conversation.state, _Mirror)
        history.apply(conversation)
        return conversation  # sent to the worker by _sync at its next turn

    def history_ids(self, conversation: Conversation) -> list[int]:
        m = conversation.state
        if not isinstance(m, _Mirror):
            raise ValueError("conversation was not created by this engine")
        return list(m.ids)

    def history_text(self, conversation: Conversation) -> str:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(
                self.model_name, local_files_only=self._kwargs.get("local_files_only", False)
            )
        return str(self._tokenizer.decode(self.history_ids(conversation)))


def _log(f: _InFlight, entered: bool) -> None:
    """Note a turn's fate in the parent's log (one that failed: nothing entered)."""
    m = f.conversation.state
    if isinstance(m, _Mirror):
        m.turn_log.note(f.seq, entered)
