"""Qwen2-Audio engine: one worker thread owns the model and serves every session.

`submit` (on the event loop) queues a turn and returns a handle at once. Each
worker loop iteration runs one prefill forward (the new turns' audio and text,
all started turns that need one together in ONE batched forward, see
kv.prefill_rows; else a speculative prefill) and then ONE batched decode step
for every turn that is decoding (continuous batching, up to `max_batch` turns:
turns join after their prefill and leave when they end, see kv.DecodeBatch),
so new turns hold the others up for about one step, however many arrive.
Turns of one conversation run strictly in order. Deltas reach the caller's
loop through `loop.call_soon_threadsafe`, one wake-up per loop per step.

Each conversation keeps its history as token ids, the ChatML messages it was
rendered from, its audio clips and its DynamicCache. With `kv_reuse` a turn
prefills only the ids the cache has not seen, with only the new clips'
features; without it, every turn re-runs the whole history (the baseline).
`kv_cache_budget` bounds the bytes of cache kept: over it, the least recently
used idle conversation's cache is dropped (rebuilt from its ids at its next
turn) and new turns wait while the running ones would not fit.
`prefill_speculative` prefills the utterance so far during the VAD hangover;
the real turn takes it over when its audio is the same samples.
`edit_history` queues an edit in order with the conversation's turns; the
worker applies it between them and crops the cache to match (editing.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from voice_agent.engine import defaults
from voice_agent.engine.base import (
    AudioArray,
    Conversation,
    Engine,
    EngineStats,
    History,
    HistoryEdit,
    QueueTurnHandle,
    TurnHandle,
    TurnInput,
    edit_future,
)
from voice_agent.engine.qwen2_audio.core import Probe
from voice_agent.engine.qwen2_audio.editing import _Editing
from voice_agent.engine.qwen2_audio.forward import _Forward
from voice_agent.engine.qwen2_audio.loading import _Loading, tune_backends
from voice_agent.engine.qwen2_audio.output import _Output
from voice_agent.engine.qwen2_audio.prompting import _Prompting
from voice_agent.engine.qwen2_audio.scheduler import Scheduler
from voice_agent.engine.qwen2_audio.speculative import _Speculation
from voice_agent.engine.qwen2_audio.state import _ConvState, _Edit, _SpecRequest, _Turn
from voice_agent.engine.qwen2_audio.worker import _Worker
from voice_agent.engine.tiny import is_demo_config
from voice_agent.errors import EngineError

DEFAULT_MODEL = defaults.DEFAULT_MODEL


class Qwen2AudioEngine(
    _Worker, _Speculation, _Editing, _Output, _Forward, _Prompting, _Loading, Engine
):
    """Qwen2AudioForConditionalGeneration behind a single worker thread."""

    # `ready()` is False once the worker has not come round its loop for this
    # long (it comes round at least every 0.5 s when idle, every step when busy).
    worker_stall_s = 60.0
    # Bounds of one batched prefill forward (a lone turn is never held back):
    # rows x the longest row's new tokens, and rows x (longest cache + longest
    # new block), the token slots of the padded batched cache it copies.
    prefill_batch_tokens = 8192
    prefill_batch_slots = 16384
    # A test and diagnostics hook, off by default (None costs one attribute
    # test per point). Called on the worker thread as probe(point, turn) at:
    #   "prepare": before a turn's new ids and features are built (a
    #              speculative prefill's too), with its TurnInput;
    #   "decode":  before each batched decode step, with None.
    # What it raises fails what that point serves, as a model error would:
    # the turn being prepared; every turn of the decode step. It may block
    # (a test holds the worker inside a step). Set it on the instance.
    probe: Probe | None = None

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        temperature: float = defaults.TEMPERATURE,
        top_p: float = defaults.TOP_P,
        max_queue: int = defaults.MAX_QUEUE,
        kv_reuse: bool = True,
        seed: int = 0,
        demo_model: bool = False,
        local_files_only: bool = False,
        *,
        max_batch: int = defaults.MAX_BATCH,
        kv_cache_budget: int = defaults.KV_CACHE_BUDGET,
        max_active: int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`max_batch`: turns decoding at once (one batched forward per step);
        more wait. `kv_cache_budget`: bytes of KV cache kept (0: unlimited);
        over it the least recently used idle conversation's cache is dropped
        and rebuilt from its token ids at its next turn. `max_active` is the
        old name of `max_batch`."""
        self.model_name = model
        self.device_name = device
        self.dtype_name = dtype
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.kv_reuse = kv_reuse
        self.seed = seed
        self.demo_model = demo_model
        self.local_files_only = local_files_only
        self._sched: Scheduler[_ConvState] = Scheduler(
            max_queue=max_queue,
            max_batch=max_batch if max_active is None else max_active,
            kv_cache_budget=kv_cache_budget,
        )
        self.stats: dict[str, int] = {
            "evictions": 0,
            "speculative_hits": 0,
            "speculative_misses": 0,
            "batched_steps": 0,
            "max_batch_seen": 0,
            "prefills": 0,  # prefills of one row (a turn alone, or a speculative one)
            "batched_prefills": 0,  # prefill forwards of two rows or more
            "batched_prefill_rows": 0,  # turns prefilled in those
            "max_prefill_rows": 0,
        }
        self._clock = clock

        self._init_loading()

        self._batch = None
        self._deferred = None
        self._inbox = queue.SimpleQueue()
        self._lock = self._sched.lock
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ids = itertools.count(1)
        self._beat = 0.0  # time.monotonic() of the worker's last loop iteration

    @classmethod
    def from_loaded(cls, model: Any, processor: Any, **kwargs: Any) -> Qwen2AudioEngine:
        """An engine around an already-built model and processor (benchmarks of
        random real-size configs, which are never saved and loaded)."""
        engine = cls(**kwargs)
        engine.device = next(model.parameters()).device
        engine.dtype = next(model.parameters()).dtype
        model.eval()
        engine.model = model
        engine.processor = processor
        engine.demo_model = engine.demo_model or is_demo_config(model.config)
        engine._setup_tokens()
        engine._generator = torch.Generator(device=engine.device)
        engine._generator.manual_seed(engine.seed)
        tune_backends(engine.device)
        return engine

    # The scheduler's limits, as the engine's attributes.
    @property
    def max_queue(self) -> int:
        return self._sched.max_queue

    @max_queue.setter
    def max_queue(self, value: int) -> None:
        self._sched.max_queue = value

    @property
    def max_batch(self) -> int:
        return self._sched.max_batch

    @max_batch.setter
    def max_batch(self, value: int) -> None:
        self._sched.max_batch = max(1, value)

    @property
    def kv_cache_budget(self) -> int:
        return self._sched.kv_cache_budget

    @kv_cache_budget.setter
    def kv_cache_budget(self, value: int) -> None:
        self._sched.kv_cache_budget = max(0, value)

    @property
    def _bytes_per_token(self) -> int:
        """KV cache bytes per token of this model and dtype (0 until loaded)."""
        return self._sched.bytes_per_token

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._sched.stopping = False
            self._beat = time.monotonic()
            self._thread = threading.Thread(
                target=self._worker, name="voice-agent-engine", daemon=True
            )
            self._thread.start()

    async def start(self) -> None:
        if not self.loaded:
            await asyncio.to_thread(self.load)
        self._closed = False
        self._start_thread()

    async def close(self) -> None:
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        self._sched.stop(lambda: self._inbox.put(None))
        await asyncio.to_thread(thread.join)
        self._thread = None

    def new_conversation(
        self, system_prompt: str | None = None, conversation_id: str | None = None
    ) -> Conversation:
        cid = conversation_id or f"conv-{next(self._ids)}"
        state = _ConvState()
        if system_prompt is not None:
            state.messages.append({"role": "system", "content": system_prompt})
        return Conversation(cid, system_prompt, state=state)

    def submit(
        self, conversation: Conversation, turn: TurnInput, max_new_tokens: int | None = None
    ) -> TurnHandle:
        if not self.loaded:
            raise EngineError("the engine is not started")
        if not isinstance(conversation.state, _ConvState):
            raise ValueError("conversation was not created by this engine")
        loop = asyncio.get_running_loop()
        handle = QueueTurnHandle(loop)
        item = _Turn(
            conversation=conversation,
            state=conversation.state,
            turn=turn,
            handle=handle,
            max_new_tokens=max(
                1, self.max_new_tokens if max_new_tokens is None else max_new_tokens
            ),
            submitted=self._clock(),
        )
        if self._closed:
            raise EngineError("the engine is closed")
        self._start_thread()

        # Atomic with close(): a turn is either refused or served.
        def enqueue() -> None:
            item.seq = item.state.turn_log.submit()
            self._inbox.put(item)

        self._sched.admit(item.state, enqueue)
        return handle

    def edit_history(self, conversation: Conversation, edit: HistoryEdit) -> asyncio.Future[bool]:
        st = self._state(conversation)
        future = edit_future()
        if not self.loaded or self._closed:
            future.set_exception(EngineError("the engine is closed"))
            return future
        item = _Edit(conversation, st, edit, future, st.turn_log.submitted)
        self._start_thread()
        try:
            self._sched.admit_edit(lambda: self._inbox.put(item))
        except EngineError as exc:
            future.set_exception(exc)
        return future

    def release(self, conversation: Conversation) -> None:
        st = conversation.state
        if isinstance(st, _ConvState) and not st.running:
            st.drop_cache()  # rebuilt from the history (ids + clips) at the next turn

    def prefill_speculative(self, conversation: Conversation, audio: AudioArray) -> bool:
        """Encode and prefill `audio` as the conversation's next user turn, ahead
        of time (while the VAD's hangover runs). A later `submit` of a turn with
        exactly these samples (and no text) starts decoding at once; any other
        turn, or `discard_speculative`, drops it. Returns False when it was not
        queued (engine busy, closed, or the conversation has a turn queued)."""
        st = conversation.state
        if not isinstance(st, _ConvState):
            raise ValueError("conversation was not created by this engine")
        if not self.loaded or self._closed or self._sched.stopping:
            return False
        if not self._sched.may_speculate(st):
            return False
        self._start_thread()
        self._inbox.put(_SpecRequest(st, TurnInput(audio=np.asarray(audio, dtype=np.float32))))
        return True

    def discard_speculative(self, conversation: Conversation) -> None:
        """Drop a speculative prefill (speech resumed)."""
        st = conversation.state
        if isinstance(st, _ConvState) and self._thread is not None and not self._closed:
            self._inbox.put(_SpecRequest(st, None))

    def cached_tokens(self, conversation: Conversation) -> int | None:
        """Tokens in the KV cache the conversation keeps for its next turn;
        None when it keeps none (no turn yet, dropped over the KV budget or
        after a failed turn, without kv_reuse, or while a turn of it decodes:
        the decode batch holds that cache then). For tests and diagnostics:
        read without the worker's lock, so exact only between turns."""
        cache = self._state(conversation).cache
        return None if cache is None else int(cache.get_seq_length())

    def speculating(self, conversation: Conversation) -> bool:
        """A speculative prefill of the conversation's next turn is ready (see
        `prefill_speculative`), not yet taken over by a turn or discarded."""
        return self._state(conversation).spec is not None

    @staticmethod
    def _state(conversation: Conversation) -> _ConvState:
        st = conversation.state
        if not isinstance(st, _ConvState):
            raise ValueError("conversation was not created by this engine")
        return st

    def runtime_stats(self) -> EngineStats:
        """Rows of the decode batch, KV cache bytes (the batch's slots, pads
        included, plus every idle conversation's cache) and turns waiting.
        Read from another thread while the worker runs: a figure may be one
        step old; nothing here takes the worker's time."""
        tokens = rows = 0
        with contextlib.suppress(Exception):  # the worker changed the batch meanwhile
            batch = self._batch
            if batch is not None:
                rows, tokens = len(batch.owners), batch.allocated_tokens
        for st in self._sched.cached_states():  # may miss some, this once
            with contextlib.suppress(Exception):
                tokens += st.cached_tokens()
        return EngineStats(rows, tokens * self._bytes_per_token, max(0, self._sched.pending))

    def healthy(self) -> bool:
        """Loaded, started, and the worker thread alive and coming round its loop."""
        thread = self._thread
        return (
            self.loaded
            and not self._closed
            and thread is not None
            and thread.is_alive()
            and time.monotonic() - self._beat < self.worker_stall_s
        )

    async def ready(self) -> bool:
        return self.healthy()

    def snapshot(self, conversation: Conversation) -> History | None:
        st = conversation.state
        if not isinstance(st, _ConvState):
            raise ValueError("conversation was not created by this engine")
        if st.running:  # the worker may be writing the history right now: not now
            return None
        return History.of(st, conversation.turns)

    def restore(
        self, conversation_id: str, system_prompt: str | None, history: History
    ) -> Conversation:
        conversation = self.new_conversation(system_prompt, conversation_id)
        assert isinstance(conversation.state, _ConvState)
        history.apply(conversation)
        return conversation
