"""Qwen2-Audio engine: one worker thread owns the model and serves every session.

`submit` (on the event loop) queues a turn and returns a handle at once. The
worker keeps a set of active turns and advances them round-robin, one model
step each (the prefill of a new turn is one step, then one decode step per
token), so every session progresses; turns of one conversation run strictly in
order. Deltas reach the caller's loop through `loop.call_soon_threadsafe`.

Each conversation keeps its history as token ids, the ChatML messages it was
rendered from, its audio clips and its DynamicCache. With `kv_reuse` a turn
prefills only the ids the cache has not seen, with only the new clips'
features; without it, every turn re-runs the whole history (the baseline).
"""

from __future__ import annotations

import asyncio
import importlib
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from voice_agent.audio import split_clips as _split_clips
from voice_agent.engine.base import (
    SAMPLE_RATE,
    AudioArray,
    Conversation,
    Delta,
    Engine,
    QueueTurnHandle,
    Timing,
    TurnHandle,
    TurnInput,
    TurnResult,
    Usage,
)
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


@dataclass
class _ConvState:
    """What the engine keeps per conversation (in Conversation.state)."""

    messages: list[Message] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    clips: list[AudioArray] = field(default_factory=list)
    clip_starts: list[int] = field(default_factory=list)  # index of each clip's first <|AUDIO|>
    cache: Any = None  # DynamicCache | None
    running: bool = False  # a turn of this conversation is active


@dataclass
class _Turn:
    conversation: Conversation
    state: _ConvState
    turn: TurnInput
    handle: QueueTurnHandle
    max_new_tokens: int
    submitted: float
    started: float = 0.0
    first_delta: float = 0.0
    prefilled: bool = False
    # Filled by prefill:
    new_message: Message | None = None
    new_clips: list[AudioArray] = field(default_factory=list)
    new_starts: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    cache: Any = None
    next_token: int = -1
    reply: list[int] = field(default_factory=list)
    fed: int = 0  # reply tokens fed to the model (in the cache)
    emitted: str = ""


class Qwen2AudioEngine(Engine):
    """Qwen2AudioForConditionalGeneration behind a single worker thread."""

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
        max_active: int = 16,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
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
        self.max_active = max(1, max_active)
        self._clock = clock

        self.model: Any = None
        self.processor: Any = None
        self.device: torch.device = torch.device("cpu")
        self.dtype: torch.dtype = torch.float32
        self._stop_ids: set[int] = set()
        self._im_end_id = -1
        self._newline_ids: list[int] = []
        self._audio_token_id = -1
        self._generator: torch.Generator | None = None
        self._banned_ids = torch.zeros(0, dtype=torch.long)

        self._inbox: queue.SimpleQueue[_Turn | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._pending = 0  # submitted turns not yet active (the bounded queue)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        self._ids = itertools.count(1)

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
        # Tokens a reply must never contain: they would break the history's
        # audio placeholders or its ChatML structure.
        banned = {self._audio_token_id}
        for t in ("<|audio_bos|>", "<|audio_eos|>", "<|im_start|>"):
            i = tok.convert_tokens_to_ids(t)
            if isinstance(i, int) and i >= 0 and i != unk:
                banned.add(i)
        self._banned_ids = torch.tensor(sorted(banned), dtype=torch.long)

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
            self._inbox.put(item)
        return handle

    def release(self, conversation: Conversation) -> None:
        st = conversation.state
        if isinstance(st, _ConvState) and not st.running:
            st.cache = None  # rebuilt from the history (ids + clips) at the next turn

    def history_text(self, conversation: Conversation) -> str:
        state = conversation.state
        if not isinstance(state, _ConvState):
            raise ValueError("conversation was not created by this engine")
        return str(self.processor.tokenizer.decode(list(state.ids), skip_special_tokens=False))

    # --------------------------------------------------------------- worker

    def _worker(self) -> None:
        waiting: deque[_Turn] = deque()
        active: list[_Turn] = []
        with torch.inference_mode():
            while True:
                block = not active and not waiting
                try:
                    item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
                    while True:
                        if item is not None:
                            waiting.append(item)
                        item = self._inbox.get_nowait()
                except queue.Empty:
                    pass
                if self._stopping:
                    for t in itertools.chain(active, waiting):
                        t.handle.cancel()
                        try:
                            self._finish_cancel(t)
                        except Exception:
                            logger.exception("could not settle a cancelled turn")
                            t.handle.push(EngineError("the model failed on this turn"))
                    with self._lock:
                        self._pending -= len(waiting)
                    return
                self._promote(waiting, active)
                # Round robin: one step per active turn. A batched decode step
                # over all active turns would replace this loop.
                for t in list(active):
                    if self._step(t):
                        active.remove(t)

    def _promote(self, waiting: deque[_Turn], active: list[_Turn]) -> None:
        blocked: set[int] = set()
        keep: deque[_Turn] = deque()
        while waiting:
            t = waiting.popleft()
            key = id(t.state)
            if t.handle.cancel_requested and key not in blocked:
                with self._lock:
                    self._pending -= 1
                self._drop_unstarted(t)
                continue
            if key in blocked or t.state.running or len(active) >= self.max_active:
                blocked.add(key)
                keep.append(t)
                continue
            with self._lock:
                self._pending -= 1
            t.state.running = True
            t.started = self._clock()
            active.append(t)
            blocked.add(key)
        waiting.extend(keep)

    def _step(self, t: _Turn) -> bool:
        """Advance one turn by one model step; True when it has finished."""
        try:
            if t.handle.cancel_requested:
                self._finish_cancel(t)
                return True
            if not t.prefilled:
                self._prefill(t)
            else:
                self._decode(t)
            tok = t.next_token
            if tok in self._stop_ids:
                self._finish(t, cancelled=False)
                return True
            t.reply.append(tok)
            self._emit(t)
            if len(t.reply) >= t.max_new_tokens:
                self._finish(t, cancelled=False)
                return True
            return False
        except Exception:
            logger.exception(
                "the model failed on a turn of conversation %s", t.conversation.conversation_id
            )
            t.state.cache = None  # rebuilt from the history next turn
            t.state.running = False
            t.handle.push(EngineError("the model failed on this turn"))
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

    def _prefill(self, t: _Turn) -> None:
        st = t.state
        content: list[dict[str, Any]] = []
        if t.turn.audio is not None:
            t.new_clips = split_clips(t.turn.audio)
            n0 = len(st.clips)
            content.extend(
                {"type": "audio", "audio": f"clip-{n0 + i + 1}"} for i in range(len(t.new_clips))
            )
        if t.turn.text:
            content.append({"type": "text", "text": t.turn.text})
        t.new_message = {"role": "user", "content": content}
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
        if cached > len(st.ids):
            cache, cached = None, 0
        if cache is None:
            cache = importlib.import_module("transformers").DynamicCache(config=self.model.config)
            cached = 0
        # The clips whose audio tokens the cache has not seen.
        new_starts = self._audio_starts(new_ids, len(st.ids))
        all_clips = st.clips + t.new_clips
        all_starts = st.clip_starts + new_starts
        if len(all_starts) != len(all_clips):
            raise RuntimeError("audio placeholders and clips do not match")
        clips = [c for c, s in zip(all_clips, all_starts, strict=True) if s >= cached]
        t.cached_tokens = cached
        t.cache = cache
        st.cache = cache if self.kv_reuse else None
        t.new_starts = new_starts
        logits = self._forward(t.prompt_ids[cached:], cached, cache, clips)
        t.next_token = self._sample(logits)
        t.prefilled = True

    def _audio_starts(self, ids: list[int], offset: int) -> list[int]:
        a = self._audio_token_id
        return [offset + i for i, x in enumerate(ids) if x == a and (i == 0 or ids[i - 1] != a)]

    def _decode(self, t: _Turn) -> None:
        pos = len(t.prompt_ids) + t.fed
        logits = self._forward([t.reply[-1]], pos, t.cache, [])
        t.fed += 1
        t.next_token = self._sample(logits)

    def _forward(
        self, ids: list[int], start: int, cache: Any, clips: list[AudioArray]
    ) -> torch.Tensor:
        """Run `ids` (at positions start..) through the model; logits of the last one."""
        dev = self.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.arange(start, start + len(ids), device=dev).unsqueeze(0)
        kwargs: dict[str, Any] = {}
        if clips:
            feats, mask = self._features(clips)
            kwargs["input_features"] = feats.to(dev, self.dtype)
            kwargs["feature_attention_mask"] = mask.to(dev)
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
            logits[self._banned_ids.to(logits.device)] = float("-inf")
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

    # ------------------------------------------------------------- results

    def _emit(self, t: _Turn) -> None:
        text = self._decode_text(t.reply)
        if text.endswith("\ufffd") or not text.startswith(t.emitted):
            return
        piece = text[len(t.emitted) :]
        if not piece:
            return
        t.emitted = text
        if not t.first_delta:
            t.first_delta = self._clock()
        t.handle.push(Delta(piece, len(t.reply)))

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
        t.conversation.turns += 1
        t.conversation.audio_clips = len(st.clips)
        st.running = False
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
