"""The worker loop: take turns in, run one prefill and one batched decode step
per iteration, settle cancellations; the scheduler decides what runs."""

from __future__ import annotations

import itertools
import logging
import queue
import time
from collections import deque
from collections.abc import Callable
from functools import partial

import torch

from voice_agent.engine.base import QueueTurnHandle
from voice_agent.engine.kv import DecodeBatch
from voice_agent.engine.qwen2_audio.core import EngineCore
from voice_agent.engine.qwen2_audio.editing import resolve
from voice_agent.engine.qwen2_audio.scheduler import QueuedEdit, pick_prefill_rows
from voice_agent.engine.qwen2_audio.state import _ConvState, _Edit, _SpecRequest, _Turn, _Waiting
from voice_agent.errors import EngineError

logger = logging.getLogger("voice_agent.engine")

# An idle worker still comes round its loop this often, so that `healthy()`
# (its heartbeat within Qwen2AudioEngine.worker_stall_s) holds while idle.
IDLE_WAKE_S = 0.5


class _Worker(EngineCore):
    """The loop of the engine's one worker thread."""

    def _worker(self) -> None:
        """One loop iteration: take new turns, settle cancellations, run one
        prefill forward (every started turn that needs one, batched; else a
        speculative one), then one batched decode step for every decoding turn.
        New turns' prefill therefore delays the others by about one step."""
        waiting: deque[_Waiting] = deque()  # turns and history edits
        specs: deque[_SpecRequest] = deque()
        active: list[_Turn] = []  # started: prefilling or decoding
        batch = DecodeBatch(self.model.config)
        self._batch = batch
        with torch.inference_mode():
            while True:
                self._beat = time.monotonic()
                block = not active and not waiting and not specs
                try:
                    if block:
                        item = self._inbox.get(timeout=IDLE_WAKE_S)
                    else:
                        item = self._inbox.get_nowait()
                    while True:
                        if isinstance(item, _Turn | _Edit):
                            waiting.append(item)
                        elif isinstance(item, _SpecRequest):
                            specs.append(item)
                        item = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                if self._sched.stopping:
                    self._shutdown(batch, active, waiting)
                    return
                try:
                    self._iterate(waiting, specs, active, batch)
                except Exception:  # a bug outside model calls: fail what runs, go on
                    logger.exception("engine step failed; failing the turns in flight")
                    batch.clear()
                    for t in active:
                        t.in_batch = False
                        self._fail(t)
                    active.clear()

    def _iterate(
        self,
        waiting: deque[_Waiting],
        specs: deque[_SpecRequest],
        active: list[_Turn],
        batch: DecodeBatch,
    ) -> None:
        self._promote(waiting, active)
        for t in [t for t in active if t.handle.cancel_requested]:
            active.remove(t)
            self._leave(batch, [t])
            self._guard(t, partial(self._finish_cancel, t))
        if not self._prefill_some(active, batch):
            self._speculate_one(specs, waiting, active)
        if len(batch):
            for t in self._decode_step(batch):
                active.remove(t)

    def _shutdown(self, batch: DecodeBatch, active: list[_Turn], waiting: deque[_Waiting]) -> None:
        for t in itertools.chain(active, waiting):
            if not isinstance(t, _Turn):
                if isinstance(t, _Edit):
                    resolve(t, EngineError("the engine is closed"))
                continue
            t.handle.cancel()
            self._leave(batch, [t])
            self._guard(t, partial(self._finish_cancel, t))
        self._sched.unqueue(waiting)

    def _guard(self, t: _Turn, fn: Callable[[], None]) -> None:
        """Run fn for turn t; on an exception fail only that turn."""
        try:
            fn()
        except Exception:
            self._fail(t)

    def _promote(self, waiting: deque[_Waiting], active: list[_Turn]) -> None:
        """Start the waiting turns the scheduler lets in (and drop the cancelled);
        apply the history edits whose conversation's earlier turns have ended."""

        def start(t: _Turn) -> None:
            t.started = self._clock()

        def apply(e: QueuedEdit) -> None:
            assert isinstance(e, _Edit)
            self._apply_edit(e)

        self._sched.promote(waiting, active, start, self._drop_unstarted, apply)

    def _prefill_some(self, active: list[_Turn], batch: DecodeBatch) -> bool:
        """Prefill the started turns that need it, together in one forward as far
        as the bounds allow (turns whose speculative prefill matches take it over
        for free; the rest wait for the next iteration). True when a prefill ran."""
        todo: list[_Turn] = []
        for t in list(active):
            if t.prefilled:
                continue
            try:
                if t.prep is None and self._adopt_spec(t):
                    t.prefilled = True
                    self._after_prefill(t, active, batch)
                    continue
            except Exception:
                self._drop_failed(t, active, batch)
                continue
            todo.append(t)
        if not todo:
            return False
        if len(todo) == 1 and todo[0].prep is None:
            self._prefill_each(todo, active, batch)
            return True
        prepared: list[_Turn] = []
        for t in todo:
            try:
                if t.prep is None:
                    t.prep = self._prepare(t, t.state, t.turn)
            except Exception:
                self._drop_failed(t, active, batch)
                continue
            prepared.append(t)
        sizes: list[tuple[int, int]] = []  # each row's cached and new tokens
        for t in prepared:
            assert t.prep is not None
            sizes.append((t.prep.cached, len(t.prompt_ids) - t.prep.cached))
        # The turns left out wait for the next iteration (they keep their preparation).
        picked = pick_prefill_rows(sizes, self.prefill_batch_tokens, self.prefill_batch_slots)
        rows = [prepared[i] for i in picked]
        if len(rows) > 1:
            try:
                self._prefill_batch(rows)
            except Exception:
                logger.warning(
                    "batched prefill of %d turns failed; prefilling them one at a time",
                    len(rows),
                    exc_info=True,
                )
            else:
                self.stats["batched_prefills"] += 1
                self.stats["batched_prefill_rows"] += len(rows)
                self.stats["max_prefill_rows"] = max(self.stats["max_prefill_rows"], len(rows))
                for t in rows:
                    t.prep, t.prefilled = None, True
                    self._after_prefill(t, active, batch)
                return True
        self._prefill_each(rows, active, batch)
        return bool(rows)

    def _prefill_each(self, turns: list[_Turn], active: list[_Turn], batch: DecodeBatch) -> None:
        """Prefill these turns one at a time (one model forward each)."""
        for t in turns:
            try:
                self._prefill(t, t.state, t.turn, t.prep)
                t.prep, t.prefilled = None, True
            except Exception:
                self._drop_failed(t, active, batch)
                continue
            self._after_prefill(t, active, batch)

    def _after_prefill(self, t: _Turn, active: list[_Turn], batch: DecodeBatch) -> None:
        """Take a prefilled turn's first token; it ends, or joins the decode batch."""
        try:
            self._enforce_budget(batch, active)
            if self._take_token(t):
                active.remove(t)
                self._finish(t, cancelled=False)
            else:
                batch.add(t, t.cache, len(t.prompt_ids))
                t.cache, t.in_batch = None, True
                t.state.cache = None  # the batch owns it while the turn decodes
                self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(batch))
        except Exception:
            self._drop_failed(t, active, batch)

    def _drop_failed(self, t: _Turn, active: list[_Turn], batch: DecodeBatch) -> None:
        if t in active:
            active.remove(t)
        t.prep = None
        self._leave(batch, [t])
        self._fail(t)

    def _take_token(self, t: _Turn) -> bool:
        """Take t.next_token as the next reply token; True when the turn ends."""
        tok = t.next_token
        if tok in self._stop_ids:
            return True
        t.reply.append(tok)
        self._emit(t)
        return len(t.reply) >= t.max_new_tokens

    def _decode_step(self, batch: DecodeBatch) -> list[_Turn]:
        """One batched decode step; returns the turns that have finished."""
        turns = [t for t in batch.owners if isinstance(t, _Turn)]
        try:
            if self.probe is not None:
                self.probe("decode", None)
            logits = self._decode_batch(batch, turns)
            self.stats["batched_steps"] += 1
            for t in turns:
                t.fed += 1
            tokens = self._sample_rows(logits)
        except Exception:
            batch.clear()
            for t in turns:
                t.in_batch = False
                self._fail(t)
            return turns
        done, failed = [], []
        self._deferred = []
        try:
            for t, tok in zip(turns, tokens, strict=True):
                t.next_token = tok
                try:
                    if self._take_token(t):
                        done.append(t)
                except Exception:
                    failed.append(t)
        finally:
            deferred, self._deferred = self._deferred, None
            QueueTurnHandle.push_all(list(deferred))
        self._leave(batch, done + failed)
        for t in failed:
            self._fail(t)
        for t in done:
            self._guard(t, partial(self._finish, t, False))
        return done + failed

    def _touch(self, st: _ConvState) -> None:
        self._sched.touch(st)

    def _enforce_budget(self, batch: DecodeBatch, active: list[_Turn]) -> None:
        """Drop least recently used idle caches while over the budget."""
        if self._sched.kv_cache_budget <= 0:
            return
        tokens = batch.allocated_tokens
        tokens += sum(len(t.prompt_ids) + t.fed for t in active if t.prefilled and not t.in_batch)
        self.stats["evictions"] += len(self._sched.enforce_budget(tokens))
