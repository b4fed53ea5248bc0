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
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import logging
import os
import queue
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from voice_agent.audio import split_clips as _split_clips
from voice_agent.engine import prompt
from voice_agent.engine.base import (
    SAMPLE_RATE,
    AudioArray,
    Conversation,
    Delta,
    Engine,
    EngineStats,
    History,
    QueueTurnHandle,
    Timing,
    TurnHandle,
    TurnInput,
    TurnResult,
    Usage,
)
from voice_agent.engine.kv import DecodeBatch, bytes_per_token, new_cache, prefill_rows
from voice_agent.errors import Busy, EngineError, ModelLoadError

logger = logging.getLogger("voice_agent.engine")

DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"
MAX_CLIP_SECONDS = 30.0
MIN_CLIP_SAMPLES = SAMPLE_RATE // 10  # 0.1 s: at least 2 audio tokens

Message = dict[str, Any]


def split_clips(a: AudioArray, max_seconds: float = MAX_CLIP_SECONDS) -> list[AudioArray]:
    """Cut audio into clips of at most 30 s, each padded to at least 0.1 s."""
    clips = _split_clips(a, max_seconds)
    out: list[AudioArray] = []
    for clip in clips or [np.zeros(0, dtype=np.float32)]:
        c = np.asarray(clip, dtype=np.float32)
        if len(c) < MIN_CLIP_SAMPLES:
            c = np.pad(c, (0, MIN_CLIP_SAMPLES - len(c)))
        out.append(c)
    return out


@dataclass(eq=False)
class _ConvState:
    """What the engine keeps per conversation (in Conversation.state)."""

    messages: list[Message] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    clips: list[AudioArray] = field(default_factory=list)
    clip_starts: list[int] = field(default_factory=list)  # index of each clip's first <|AUDIO|>
    cache: Any = None  # DynamicCache | None
    running: bool = False  # a turn of this conversation is active
    queued: int = 0  # turns submitted and not started yet
    spec: _Spec | None = None  # a speculative prefill of the next turn


@dataclass(kw_only=True, eq=False)
class _Prefill:
    """What a prefill leaves: the turn's prompt in the cache and its first token."""

    new_message: Message | None = None
    new_clips: list[AudioArray] = field(default_factory=list)
    new_starts: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    cache: Any = None
    next_token: int = -1


@dataclass(eq=False)
class _Prep:
    """A prepared prefill: what the forward needs besides the turn's fields."""

    cache: Any  # the conversation's cache to extend (DynamicCache), None: start afresh
    cached: int  # tokens in it
    # Log-mel features (and their mask) of the clips whose audio tokens the
    # cache has not seen, in order; None: no such clip.
    features: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(kw_only=True, eq=False)
class _Spec(_Prefill):
    """A speculative prefill: the next turn as if it were `turn`."""

    turn: TurnInput


@dataclass(frozen=True)
class _SpecRequest:
    state: _ConvState
    turn: TurnInput | None  # None: discard


@dataclass(kw_only=True, eq=False)
class _Turn(_Prefill):
    conversation: Conversation
    state: _ConvState
    turn: TurnInput
    handle: QueueTurnHandle
    max_new_tokens: int
    submitted: float
    started: float = 0.0
    first_delta: float = 0.0
    prefilled: bool = False
    speculated: bool = False  # the prefill came from a speculative one
    in_batch: bool = False  # its cache is a row of the decode batch
    prep: _Prep | None = None  # prepared, waiting for a batched prefill with room
    reply: list[int] = field(default_factory=list)
    fed: int = 0  # reply tokens fed to the model (in the cache)
    emitted: str = ""  # reply text sent so far
    emit_from: int = 0  # reply tokens before this index are in `emitted`


def _tune_backends(device: torch.device) -> None:
    """Process-wide kernel choices for the one engine of this process.

    On Hopper GPUs PyTorch prefers cuDNN's attention, which builds and compiles
    a new execution plan for every new (query, key) length: every decode step
    and every prefill on top of a cached conversation is a new shape, and on an
    H200 with 7B shapes that cost 50 to 700 ms of CPU per call. The flash and
    memory-efficient kernels need no per-shape plan.
    """
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


class Qwen2AudioEngine(Engine):
    """Qwen2AudioForConditionalGeneration behind a single worker thread."""

    # `ready()` is False once the worker has not come round its loop for this
    # long (it comes round at least every 0.5 s when idle, every step when busy).
    worker_stall_s = 60.0
    # Bounds of one batched prefill forward (a lone turn is never held back):
    # rows x the longest row's new tokens, and rows x (longest cache + longest
    # new block), the token slots of the padded batched cache it copies.
    prefill_batch_tokens = 8192
    prefill_batch_slots = 16384

    def __init__(
        self,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        dtype: str = "auto",
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_queue: int = 64,
        kv_reuse: bool = True,
        seed: int = 0,
        demo_model: bool = False,
        local_files_only: bool = False,
        *,
        max_batch: int = 16,
        kv_cache_budget: int = 0,
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
        self.max_queue = max_queue
        self.kv_reuse = kv_reuse
        self.seed = seed
        self.demo_model = demo_model
        self.local_files_only = local_files_only
        self.max_batch = max(1, max_batch if max_active is None else max_active)
        self.kv_cache_budget = max(0, kv_cache_budget)
        self.stats: dict[str, int] = {
            "evictions": 0,
            "speculative_hits": 0,
            "speculative_misses": 0,
            "batched_steps": 0,
            "max_batch_seen": 0,
            "batched_prefills": 0,  # prefill forwards of two rows or more
            "batched_prefill_rows": 0,  # turns prefilled in those
            "max_prefill_rows": 0,
        }
        self._clock = clock

        self.model: Any = None
        self.processor: Any = None
        self.device: torch.device = torch.device("cpu")
        self.dtype: torch.dtype = torch.float32
        self._stop_ids: set[int] = set()
        self._im_end_id = -1
        self._newline_ids: list[int] = []
        self._audio_token_id = -1
        self._pad_id = 0
        self._generator: torch.Generator | None = None
        self._banned_ids = torch.zeros(0, dtype=torch.long)

        self._bytes_per_token = 0
        self._batch: DecodeBatch | None = None
        self._deferred: list[tuple[QueueTurnHandle, Delta]] | None = None
        # Conversations holding an idle cache, least recently used first.
        self._lru: OrderedDict[int, weakref.ref[_ConvState]] = OrderedDict()
        self._inbox: queue.SimpleQueue[_Turn | _SpecRequest | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted turns not yet active (the bounded queue)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._ids = itertools.count(1)
        self._beat = 0.0  # time.monotonic() of the worker's last loop iteration

    # ------------------------------------------------------------------ load

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
        engine._setup_tokens()
        engine._generator = torch.Generator(device=engine.device)
        engine._generator.manual_seed(engine.seed)
        _tune_backends(engine.device)
        return engine

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        """Load weights and processor (blocking; call off the event loop)."""
        if self.loaded:
            return
        tf: Any = importlib.import_module("transformers")
        name = self.model_name
        self.device = self._pick_device()
        self.dtype = self._pick_dtype(self.device)
        logger.info(
            "loading model %s on %s (%s)%s",
            name,
            self.device,
            str(self.dtype).removeprefix("torch."),
            " [demo model: replies are random noise]" if self.demo_model else "",
        )
        t0 = time.perf_counter()
        try:
            local = self.local_files_only
            processor = tf.AutoProcessor.from_pretrained(name, local_files_only=local)
            logger.info("processor loaded; loading weights")
            model = tf.Qwen2AudioForConditionalGeneration.from_pretrained(
                name, dtype=self.dtype, local_files_only=self.local_files_only
            )
            model.to(self.device)
            model.eval()
        except Exception as exc:
            raise ModelLoadError(self._load_error_message(name, exc)) from exc
        if getattr(model.config, "model_type", "") != "qwen2_audio" or not hasattr(
            processor, "feature_extractor"
        ):
            raise ModelLoadError(
                f"cannot load model {name!r}: it is not a Qwen2-Audio model; "
                "pass --model with a Qwen2-Audio directory or hub id"
            )
        self.model = model
        self.processor = processor
        self._setup_tokens()
        if self.device.type == "cuda":
            self._generator = torch.Generator(device=self.device)
        else:
            self._generator = torch.Generator()
        self._generator.manual_seed(self.seed)
        _tune_backends(self.device)
        logger.info("model %s ready in %.1f s", name, time.perf_counter() - t0)

    def _pick_device(self) -> torch.device:
        if self.device_name == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.device_name)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"bad device {self.device_name!r}: use auto, cpu, cuda or cuda:N"
            ) from exc

    def _pick_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype_name == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        dtypes = {
            "float32": torch.float32,
            "fp32": torch.float32,
            "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16,
            "float16": torch.float16,
            "fp16": torch.float16,
        }
        if self.dtype_name not in dtypes:
            raise ModelLoadError(
                f"bad dtype {self.dtype_name!r}: use auto, float32, bfloat16 or float16"
            )
        return dtypes[self.dtype_name]

    def _load_error_message(self, name: str, exc: BaseException) -> str:
        fix = "pass --model DIR with Qwen2-Audio weights, or run `voice-agent make-tiny-model DIR`"
        # A hub id is "owner/name"; anything else is meant as a directory.
        looks_like_path = name.startswith((".", "/", "~")) or name.count("/") != 1
        if os.path.isdir(name):
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return f"cannot load model {name!r}: {reason[:200]}; {fix}"
        if looks_like_path:
            return f"cannot load model {name!r}: no such directory; {fix}"
        if self.local_files_only:
            return f"cannot load model {name!r}: not in the local Hugging Face cache; {fix}"
        return (
            f"cannot load model {name!r}: no such directory and it could not be downloaded "
            f"(no network?); {fix}"
        )

    def _setup_tokens(self) -> None:
        tok = self.processor.tokenizer
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        eot = tok.convert_tokens_to_ids("<|endoftext|>")
        self._im_end_id = int(im_end)
        stop = {int(im_end), int(eot)}
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        if isinstance(eos, int):
            stop.add(eos)
        elif isinstance(eos, list):
            stop.update(int(e) for e in eos)
        unk = tok.unk_token_id
        self._stop_ids = {s for s in stop if s is not None and s >= 0 and s != unk}
        self._newline_ids = [int(i) for i in tok.encode("\n", add_special_tokens=False)]
        self._audio_token_id = int(self.model.config.audio_token_id)
        pad = tok.pad_token_id
        self._pad_id = next(
            i
            for i in (pad, self._im_end_id, 0, 1)
            if isinstance(i, int) and i >= 0 and i != self._audio_token_id
        )
        # Tokens a reply must never contain: they would break the history's
        # audio placeholders or its ChatML structure.
        banned = {self._audio_token_id}
        for t in ("<|audio_bos|>", "<|audio_eos|>", "<|im_start|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i != unk:
                banned.add(i)
        self._banned_ids = torch.tensor(sorted(banned), dtype=torch.long)
        self._bytes_per_token = bytes_per_token(self.model.config, self.dtype)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if not self.loaded:
            await asyncio.to_thread(self.load)
        self._closed = False
        self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stopping = False
            self._beat = time.monotonic()
            self._thread = threading.Thread(
                target=self._worker, name="voice-agent-engine", daemon=True
            )
            self._thread.start()

    async def close(self) -> None:
        self._closed = True
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
            self._inbox.put(None)
        await asyncio.to_thread(thread.join)
        self._thread = None

    # ------------------------------------------------------------- sessions

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
        with self._lock:  # atomic with close(): a turn is either refused or served
            if self._stopping:
                raise EngineError("the engine is shutting down")
            if self._pending >= self.max_queue:
                raise Busy("the engine is busy, try again")
            self._pending += 1
            item.state.queued += 1
            self._inbox.put(item)
        return handle

    def release(self, conversation: Conversation) -> None:
        st = conversation.state
        if isinstance(st, _ConvState) and not st.running:
            st.cache = None  # rebuilt from the history (ids + clips) at the next turn
            st.spec = None

    def prefill_speculative(self, conversation: Conversation, audio: AudioArray) -> bool:
        """Encode and prefill `audio` as the conversation's next user turn, ahead
        of time (while the VAD's hangover runs). A later `submit` of a turn with
        exactly these samples (and no text) starts decoding at once; any other
        turn, or `discard_speculative`, drops it. Returns False when it was not
        queued (engine busy, closed, or the conversation has a turn queued)."""
        st = conversation.state
        if not isinstance(st, _ConvState):
            raise ValueError("conversation was not created by this engine")
        if not self.loaded or self._closed or self._stopping:
            return False
        with self._lock:
            if self._pending >= self.max_queue or st.running or st.queued:
                return False
        self._start_thread()
        self._inbox.put(_SpecRequest(st, TurnInput(audio=np.asarray(audio, dtype=np.float32))))
        return True

    def discard_speculative(self, conversation: Conversation) -> None:
        """Drop a speculative prefill (speech resumed)."""
        st = conversation.state
        if isinstance(st, _ConvState) and self._thread is not None and not self._closed:
            self._inbox.put(_SpecRequest(st, None))

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
        try:
            refs = list(self._lru.values())
        except RuntimeError:  # changed during the copy: the idle caches count next time
            refs = []
        for ref in refs:
            st = ref()
            cache = None if st is None else st.cache
            if cache is not None:
                with contextlib.suppress(Exception):
                    tokens += int(cache.get_seq_length())
        return EngineStats(rows, tokens * self._bytes_per_token, max(0, self._pending))

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

    def history_from_messages(
        self, messages: list[dict[str, Any]], clips: list[AudioArray], turns: int
    ) -> History:
        """A History from ChatML messages (system, then user and assistant turns;
        audio items name clips "clip-1", ... in order) and their clips: renders
        and tokenizes them as the turns would have (serve-model rebuilds each
        request's conversation with it). Blocking; call it off the event loop."""
        clips = [np.asarray(c, dtype=np.float32) for c in clips]
        text = self._render(messages, False)
        ids: list[int] = []
        if text:
            enc = self.processor(
                text=[text], audio=clips or None, sampling_rate=SAMPLE_RATE, return_tensors="pt"
            )
            ids = [int(i) for i in enc["input_ids"][0].tolist()]
        starts = self._audio_starts(ids, 0)
        if len(starts) != len(clips):
            raise ValueError("audio items and clips do not match")
        return History(
            messages=[dict(m) for m in messages],
            ids=ids,
            clips=clips,
            clip_starts=starts,
            turns=turns,
        )

    def history_text(self, conversation: Conversation) -> str:
        state = conversation.state
        if not isinstance(state, _ConvState):
            raise ValueError("conversation was not created by this engine")
        return str(self.processor.tokenizer.decode(list(state.ids), skip_special_tokens=False))

    # --------------------------------------------------------------- worker

    def _worker(self) -> None:
        """One loop iteration: take new turns, settle cancellations, run one
        prefill forward (every started turn that needs one, batched; else a
        speculative one), then one batched decode step for every decoding turn.
        New turns' prefill therefore delays the others by about one step."""
        waiting: deque[_Turn] = deque()
        specs: deque[_SpecRequest] = deque()
        active: list[_Turn] = []  # started: prefilling or decoding
        batch = DecodeBatch(self.model.config)
        self._batch = batch
        with torch.inference_mode():
            while True:
                self._beat = time.monotonic()
                block = not active and not waiting and not specs
                try:
                    item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
                    while True:
                        if isinstance(item, _Turn):
                            waiting.append(item)
                        elif isinstance(item, _SpecRequest):
                            specs.append(item)
                        item = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                if self._stopping:
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
        waiting: deque[_Turn],
        specs: deque[_SpecRequest],
        active: list[_Turn],
        batch: DecodeBatch,
    ) -> None:
        self._promote(waiting, active, batch)
        for t in [t for t in active if t.handle.cancel_requested]:
            active.remove(t)
            self._leave(batch, [t])
            self._guard(t, partial(self._finish_cancel, t))
        if not self._prefill_some(active, batch):
            self._speculate_one(specs, waiting, active)
        if len(batch):
            for t in self._decode_step(batch):
                active.remove(t)

    def _shutdown(self, batch: DecodeBatch, active: list[_Turn], waiting: deque[_Turn]) -> None:
        for t in itertools.chain(active, waiting):
            t.handle.cancel()
            self._leave(batch, [t])
            self._guard(t, partial(self._finish_cancel, t))
        with self._lock:
            self._pending -= len(waiting)
            for t in waiting:
                t.state.queued -= 1

    def _guard(self, t: _Turn, fn: Callable[[], None]) -> None:
        """Run fn for turn t; on an exception fail only that turn."""
        try:
            fn()
        except Exception:
            self._fail(t)

    def _fail(self, t: _Turn) -> None:
        logger.exception(
            "the model failed on a turn of conversation %s", t.conversation.conversation_id
        )
        t.state.cache = None  # rebuilt from the history next turn
        t.state.spec = None
        t.state.running = False
        t.cache = None
        t.handle.push(EngineError("the model failed on this turn"))

    def _promote(self, waiting: deque[_Turn], active: list[_Turn], batch: DecodeBatch) -> None:
        blocked: set[int] = set()
        keep: deque[_Turn] = deque()
        while waiting:
            t = waiting.popleft()
            key = id(t.state)
            if t.handle.cancel_requested and key not in blocked:
                with self._lock:
                    self._pending -= 1
                    t.state.queued -= 1
                self._drop_unstarted(t)
                continue
            full = len(active) >= self.max_batch or (
                bool(active)
                and self._over_budget(sum(self._reserve(a) for a in active) + self._reserve(t))
            )
            if key in blocked or t.state.running or full:
                blocked.add(key)
                keep.append(t)
                continue
            with self._lock:
                self._pending -= 1
                t.state.queued -= 1
            t.state.running = True
            t.started = self._clock()
            active.append(t)
            blocked.add(key)
        waiting.extend(keep)

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
        rows: list[_Turn] = []
        cached = new = 0  # the longest cache and new block among the rows
        for t in todo:
            try:
                if t.prep is None:
                    t.prep = self._prepare(t, t.state, t.turn)
            except Exception:
                self._drop_failed(t, active, batch)
                continue
            c, n = t.prep.cached, len(t.prompt_ids) - t.prep.cached
            r, wc, wn = len(rows) + 1, max(cached, c), max(new, n)
            if rows and (
                r * wn > self.prefill_batch_tokens or r * (wc + wn) > self.prefill_batch_slots
            ):
                continue  # next iteration (it keeps its preparation)
            rows.append(t)
            cached, new = wc, wn
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

    def _decode_batch(self, batch: DecodeBatch, turns: list[_Turn]) -> torch.Tensor:
        """The model step of all decoding turns (tests hook this)."""
        return batch.step(self.model, [t.reply[-1] for t in turns])

    def _leave(self, batch: DecodeBatch, turns: list[_Turn]) -> None:
        """Take these turns' rows out of the batch, back into their own caches."""
        rows = [t for t in turns if t.in_batch]
        for t, cache in zip(rows, batch.remove(list(rows)), strict=True):
            t.cache, t.in_batch = cache, False

    # ---------------------------------------------------------- KV budget

    def _touch(self, st: _ConvState) -> None:
        key = id(st)
        self._lru.pop(key, None)
        if st.cache is not None:
            self._lru[key] = weakref.ref(st)

    def _idle_states(self) -> list[_ConvState]:
        out = []
        for key, ref in list(self._lru.items()):
            st = ref()
            if st is None or st.cache is None:
                del self._lru[key]
            elif not st.running:
                out.append(st)
        return out

    def _active_bytes(self, batch: DecodeBatch, active: list[_Turn]) -> int:
        tokens = batch.allocated_tokens
        tokens += sum(len(t.prompt_ids) + t.fed for t in active if t.prefilled and not t.in_batch)
        return tokens * self._bytes_per_token

    def _reserve(self, t: _Turn) -> int:
        """Cache bytes turn t may need by its end (an estimate before its prefill:
        history, 25 audio tokens a second, the text, the template, the reply)."""
        if t.prefilled:
            prompt = len(t.prompt_ids)
        else:
            audio = 0 if t.turn.audio is None else len(t.turn.audio) // (SAMPLE_RATE // 25) + 8
            prompt = len(t.state.ids) + audio + len(t.turn.text or "") // 2 + 32
        return (prompt + t.max_new_tokens) * self._bytes_per_token

    def _over_budget(self, used: int) -> bool:
        return self.kv_cache_budget > 0 and used > self.kv_cache_budget

    def _enforce_budget(self, batch: DecodeBatch, active: list[_Turn]) -> None:
        """Drop least recently used idle caches while over the budget."""
        if self.kv_cache_budget <= 0:
            return
        idle = self._idle_states()
        used = self._active_bytes(batch, active) + sum(
            int(st.cache.get_seq_length()) * self._bytes_per_token for st in idle
        )
        for st in idle:
            if not self._over_budget(used):
                break
            used -= int(st.cache.get_seq_length()) * self._bytes_per_token
            st.cache, st.spec = None, None
            self._lru.pop(id(st), None)
            self.stats["evictions"] += 1

    # ---------------------------------------------------- speculative prefill

    def _speculate_one(
        self, specs: deque[_SpecRequest], waiting: deque[_Turn], active: list[_Turn]
    ) -> None:
        """Serve the oldest speculative request whose conversation is idle."""
        while specs:
            req = specs.popleft()
            st = req.state
            if st.running or st.queued:
                continue  # the real turn is here already: nothing to gain
            self._discard_spec(st)
            if req.turn is None:
                continue
            spec = _Spec(turn=req.turn)
            try:
                self._prefill(spec, st, req.turn)
            except Exception:
                logger.exception("speculative prefill failed")
                st.cache, st.spec = None, None
                return
            st.spec = spec
            self._touch(st)
            if self._batch is not None:
                self._enforce_budget(self._batch, active)
            return

    def _discard_spec(self, st: _ConvState) -> None:
        """Drop a speculative prefill: crop the cache back to the history."""
        spec, st.spec = st.spec, None
        if spec is None:
            return
        cache = st.cache
        if cache is not None and cache is spec.cache:
            extra = int(cache.get_seq_length()) - len(st.ids)
            if extra > 0:
                cache.crop(-extra)

    def _adopt_spec(self, t: _Turn) -> bool:
        """Take over the conversation's speculative prefill if it is this turn."""
        st = t.state
        spec = st.spec
        if spec is None:
            return False
        a, b = spec.turn.audio, t.turn.audio
        same = (
            a is not None
            and b is not None
            and spec.turn.text == t.turn.text
            and a.shape == b.shape
            and bool(np.array_equal(a, b))
        )
        if not same:
            self.stats["speculative_misses"] += 1
            self._discard_spec(st)
            return False
        st.spec = None
        for name in (
            "new_message",
            "new_clips",
            "new_starts",
            "prompt_ids",
            "cached_tokens",
            "cache",
            "next_token",
        ):
            setattr(t, name, getattr(spec, name))
        t.speculated = True
        self.stats["speculative_hits"] += 1
        return True

    # --------------------------------------------------------- model steps

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        if not messages:
            return ""
        return str(
            self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def _features(self, clips: list[AudioArray]) -> tuple[torch.Tensor, torch.Tensor]:
        fe = self.processor.feature_extractor
        out = fe(
            clips,
            sampling_rate=SAMPLE_RATE,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_features"], out["attention_mask"]

    def _prefill(
        self, t: _Prefill, st: _ConvState, turn: TurnInput, prep: _Prep | None = None
    ) -> None:
        """Encode the new clips and prefill the new ids (one forward, extending the
        conversation's cache in place); sets t's prefill fields."""
        if prep is None:
            prep = self._prepare(t, st, turn)
        cache = prep.cache if prep.cache is not None else new_cache(self.model.config)
        t.cache = cache
        st.cache = cache if self.kv_reuse else None
        logits = self._forward(t.prompt_ids[prep.cached :], prep.cached, cache, prep.features)
        t.next_token = self._sample(logits)

    def _prepare(self, t: _Prefill, st: _ConvState, turn: TurnInput) -> _Prep:
        """Everything of a prefill but the forward: the new message rendered and
        tokenized, the prompt ids, the cache to extend and the clips to encode.
        Sets t's fields but next_token and cache; changes nothing in st."""
        t.new_clips = [] if turn.audio is None else split_clips(turn.audio)
        t.new_message = prompt.user_message(len(st.clips), len(t.new_clips), turn.text)
        # The text the history ids already cover (nothing before the first turn,
        # not even the system message).
        before = self._render(st.messages, False) if st.ids else ""
        after = self._render([*st.messages, t.new_message], True)
        if not after.startswith(before):
            raise RuntimeError("the chat template is not prefix-stable")
        new_text = after[len(before) :]
        enc = self.processor(
            text=[new_text],
            audio=t.new_clips or None,
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
        )
        new_ids = [int(i) for i in enc["input_ids"][0].tolist()]
        t.prompt_ids = st.ids + new_ids

        cache = st.cache if self.kv_reuse else None
        cached = int(cache.get_seq_length()) if cache is not None else 0
        if cached > len(st.ids) or cached == 0:
            cache, cached = None, 0
        new_starts = self._audio_starts(new_ids, len(st.ids))
        if len(new_starts) != len(t.new_clips) or len(st.clip_starts) != len(st.clips):
            raise RuntimeError("audio placeholders and clips do not match")
        # The clips whose audio tokens the cache has not seen: the new ones,
        # whose features the processor computed (the same call as _features),
        # and history clips when the cache was dropped.
        old = [c for c, s in zip(st.clips, st.clip_starts, strict=True) if s >= cached]
        parts = [self._features(old)] if old else []
        if t.new_clips:
            parts.append((enc["input_features"], enc["feature_attention_mask"]))
        features = None
        if parts:
            features = (
                torch.cat([f for f, _ in parts]).to(self.device, self.dtype),
                torch.cat([m for _, m in parts]).to(self.device),
            )
        t.cached_tokens = cached
        t.new_starts = new_starts
        return _Prep(cache, cached, features)

    def _prefill_batch(self, turns: list[_Turn]) -> None:
        """Prefill these prepared turns in ONE model forward (kv.prefill_rows);
        sets each turn's cache (and its conversation's) and first token. Leaves
        nothing changed when it raises."""
        preps: list[_Prep] = []
        for t in turns:
            assert t.prep is not None
            preps.append(t.prep)
        ids = [t.prompt_ids[p.cached :] for t, p in zip(turns, preps, strict=True)]
        features = [p.features for p in preps if p.features is not None]
        kwargs: dict[str, Any] = {}
        if features:  # every row's new clips, in row order
            kwargs["input_features"] = torch.cat([f for f, _ in features])
            kwargs["feature_attention_mask"] = torch.cat([m for _, m in features])
        logits, caches = prefill_rows(
            self.model, ids, [p.cache for p in preps], self._pad_id, **kwargs
        )
        tokens = self._sample_rows(logits)
        for t, cache, tok in zip(turns, caches, tokens, strict=True):
            t.cache, t.next_token = cache, tok
            t.state.cache = cache if self.kv_reuse else None

    def _audio_starts(self, ids: list[int], offset: int) -> list[int]:
        a = self._audio_token_id
        return [offset + i for i, x in enumerate(ids) if x == a and (i == 0 or ids[i - 1] != a)]

    def _forward(
        self,
        ids: list[int],
        start: int,
        cache: Any,
        features: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Run `ids` (at positions start..) through the model; logits of the last one."""
        dev = self.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.arange(start, start + len(ids), device=dev).unsqueeze(0)
        kwargs: dict[str, Any] = {}
        if features is not None:
            kwargs["input_features"], kwargs["feature_attention_mask"] = features
        out = self.model.model(
            input_ids=input_ids,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **kwargs,
        )
        hidden = out.last_hidden_state[:, -1, :]
        logits: torch.Tensor = self.model.lm_head(hidden)[0].float()
        return logits

    def _sample(self, logits: torch.Tensor) -> int:
        if len(self._banned_ids):
            logits[..., self._banned_ids.to(logits.device)] = float("-inf")
        if self.temperature <= 0.0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = cum - sorted_p > self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_p, 1, generator=self._generator)
            return int(order[choice].item())
        return int(torch.multinomial(probs, 1, generator=self._generator).item())

    def _sample_rows(self, logits: torch.Tensor) -> list[int]:
        """One token per row of [rows, vocab] logits."""
        if self.temperature <= 0.0:
            if len(self._banned_ids):
                logits[:, self._banned_ids.to(logits.device)] = float("-inf")
            return [int(x) for x in torch.argmax(logits, dim=-1).tolist()]
        return [self._sample(row) for row in logits]

    # ------------------------------------------------------------- results

    def _emit(self, t: _Turn) -> None:
        """Send the reply text decoded since the last piece (incrementally: a
        byte-level BPE decodes piecewise once a piece ends on a whole character)."""
        text = self._decode_text(t.reply[t.emit_from :])
        if not text or text.endswith("\ufffd"):
            return
        t.emitted += text
        t.emit_from = len(t.reply)
        if not t.first_delta:
            t.first_delta = self._clock()
        delta = Delta(text, len(t.reply))
        if self._deferred is not None:
            self._deferred.append((t.handle, delta))
        else:
            t.handle.push(delta)

    def _decode_text(self, ids: list[int]) -> str:
        return str(
            self.processor.tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def _settle(self, t: _Turn, keep: int) -> str:
        """Write the turn into the conversation: history ids, messages, clips, cache."""
        st = t.state
        kept = t.reply[:keep]
        text = self._decode_text(kept)
        assert t.new_message is not None
        st.ids = [*t.prompt_ids, *kept, self._im_end_id, *self._newline_ids]
        st.messages.extend([t.new_message, {"role": "assistant", "content": text}])
        st.clips.extend(t.new_clips)
        st.clip_starts.extend(t.new_starts)
        if self.kv_reuse and t.cache is not None:
            in_cache = len(t.prompt_ids) + t.fed
            target = len(t.prompt_ids) + min(keep, t.fed)
            if in_cache > target:
                t.cache.crop(-(in_cache - target))  # 5.24: crop(-n) removes n tokens
            st.cache = t.cache
        else:
            st.cache = None
        t.cache = None
        t.conversation.turns += 1
        t.conversation.audio_clips = len(st.clips)
        st.running = False
        self._touch(st)
        if self._batch is not None:
            self._enforce_budget(self._batch, [])
        return text

    def _usage_timing(self, t: _Turn) -> tuple[Usage, Timing]:
        now = self._clock()
        usage = Usage(
            prompt_tokens=len(t.prompt_ids),
            cached_tokens=t.cached_tokens,
            completion_tokens=len(t.reply),
        )
        first = t.first_delta or now
        timing = Timing(
            queue_ms=(t.started - t.submitted) * 1000.0,
            ttft_ms=(first - t.submitted) * 1000.0,
            total_ms=(now - t.submitted) * 1000.0,
        )
        return usage, timing

    def _finish(self, t: _Turn, cancelled: bool) -> None:
        keep = len(t.reply)
        if cancelled and t.handle.keep_tokens is not None:
            keep = min(keep, t.handle.keep_tokens)
        if not cancelled:
            # Flush text held back for an incomplete UTF-8 character.
            text = self._decode_text(t.reply)
            if text != t.emitted and text.startswith(t.emitted):
                if not t.first_delta:
                    t.first_delta = self._clock()
                t.handle.push(Delta(text[len(t.emitted) :], len(t.reply)))
        text = self._settle(t, keep)
        usage, timing = self._usage_timing(t)
        t.handle.push(TurnResult(text, usage, timing, cancelled=cancelled))

    def _finish_cancel(self, t: _Turn) -> None:
        if t.prefilled:
            self._finish(t, cancelled=True)
        else:
            if t.state.running and t.started:
                t.state.running = False
            self._drop_unstarted(t)

    def _drop_unstarted(self, t: _Turn) -> None:
        """A turn cancelled before its prefill: nothing enters the history."""
        usage, timing = self._usage_timing(t)
        t.handle.push(TurnResult("", usage, timing, cancelled=True))
