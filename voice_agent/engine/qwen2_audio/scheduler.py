"""What the Qwen2-Audio engine runs when: plain Python, no torch.

- Admission: at most `max_queue` submitted turns wait (beyond it, Busy); none
  is taken once the engine is stopping (atomic with the stop, under `lock`).
- Batching: waiting turns start in submission order while fewer than
  `max_batch` run and, with a KV budget, while the running turns' reserve plus
  theirs fits it (a lone turn always starts); turns of one conversation start
  strictly one after the other. A history edit (QueuedEdit) waits in the same
  queue, in order with its conversation's turns: it is applied once every
  earlier turn of its conversation has ended, and later turns wait for it; it
  does not count against `max_queue`. A batched prefill takes the started turns whose
  rows fit its token and slot bounds (`pick_prefill_rows`).
- KV budget and LRU: every conversation that holds a cache is in an LRU; over
  `kv_cache_budget` bytes, the least recently used idle conversation's cache is
  dropped (the engine rebuilds it from the token ids at its next turn).

The engine supplies the figures (cache lengths, reserves) through the two small
protocols below; the scheduler decides, the engine acts (tests/engine/
test_scheduler.py drives it without a model).
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, Protocol, TypeVar

from voice_agent.errors import Busy, EngineError

# The estimate of a turn's KV cache before its prefill has measured it
# (`reserve_tokens`): history + audio + text + template + the reply's cap.
# It only has to be of the right size, so each part is rounded up.
SAMPLES_PER_AUDIO_TOKEN = 16000 // 25  # the encoder: 25 audio tokens per second at 16 kHz
AUDIO_MARGIN_TOKENS = 8  # per turn's audio: "Audio N: ", <|audio_bos|>, <|audio_eos|>, newline
CHARS_PER_TEXT_TOKEN = 2  # a pessimistic ratio for the byte-level BPE (about 4 in English)
TEMPLATE_TOKENS = 32  # the ChatML frame of a turn: role markers, newlines, generation prompt


def reserve_tokens(
    *,
    history_tokens: int,
    audio_samples: int | None,
    text_chars: int,
    max_new_tokens: int,
    prompt_tokens: int | None = None,
) -> int:
    """Cache tokens a turn may need by its end: its prompt (`prompt_tokens` once
    prefilled, else an estimate from the history, its audio and text) plus its
    reply's cap."""
    if prompt_tokens is None:
        audio = 0
        if audio_samples is not None:
            audio = audio_samples // SAMPLES_PER_AUDIO_TOKEN + AUDIO_MARGIN_TOKENS
        prompt_tokens = history_tokens + audio + text_chars // CHARS_PER_TEXT_TOKEN
        prompt_tokens += TEMPLATE_TOKENS
    return prompt_tokens + max_new_tokens


def pick_prefill_rows(
    sizes: Sequence[tuple[int, int]], max_tokens: int, max_slots: int
) -> list[int]:
    """Which turns one batched prefill takes, given each turn's (cached tokens,
    new tokens) in order: rows x the longest new block stays within
    `max_tokens`, rows x (longest cache + longest new block), the token slots of
    the padded batched cache, within `max_slots`. The first turn is always
    taken; a turn that does not fit is skipped (it waits for the next prefill)
    and later, smaller ones may still join."""
    rows: list[int] = []
    cached = new = 0  # the longest cache and new block among the rows
    for i, (c, n) in enumerate(sizes):
        r, wc, wn = len(rows) + 1, max(cached, c), max(new, n)
        if rows and (r * wn > max_tokens or r * (wc + wn) > max_slots):
            continue
        rows.append(i)
        cached, new = wc, wn
    return rows


class ConvLike(Protocol):
    """A conversation as the scheduler sees it."""

    running: bool  # a turn of it has started and not ended
    queued: int  # its turns submitted and not started

    def cached_tokens(self) -> int:
        """Tokens in its KV cache (0: it holds none)."""
        ...

    def drop_cache(self) -> None:
        """Drop its cache (rebuilt from its history at its next turn)."""
        ...


class TurnLike(Protocol):
    """A submitted turn as the scheduler sees it."""

    @property
    def state(self) -> ConvLike: ...

    @property
    def cancel_requested(self) -> bool: ...

    def reserve(self) -> int:
        """Cache tokens it may need by its end (see `reserve_tokens`)."""
        ...


class QueuedEdit:
    """A waiting item that is not a turn: an edit of its conversation's history
    (the engine's subclass says which), applied in order with its turns."""

    state: Any  # the conversation's state (a ConvLike)


S = TypeVar("S", bound=ConvLike)
T = TypeVar("T", bound=TurnLike)


class Scheduler(Generic[S]):
    """Admission, batching and KV-budget decisions of one engine."""

    def __init__(self, *, max_queue: int, max_batch: int, kv_cache_budget: int) -> None:
        self.max_queue = max_queue
        self.max_batch = max(1, max_batch)
        self.kv_cache_budget = max(0, kv_cache_budget)  # bytes; 0: no limit
        self.bytes_per_token = 0  # known once the model is loaded
        self.lock = threading.Lock()  # guards pending, queued counts and stopping
        self.pending = 0  # submitted turns not started yet (the bounded queue)
        self.stopping = False
        self.evictions = 0
        # Conversations holding a cache, least recently used first.
        self._lru: OrderedDict[int, weakref.ref[S]] = OrderedDict()

    # ------------------------------------------------------------ admission

    def admit(self, state: S, enqueue: Callable[[], None]) -> None:
        """Count a submitted turn of `state` in and `enqueue` it, atomically with
        `stop`: raises EngineError once stopping, Busy when the queue is full."""
        with self.lock:
            if self.stopping:
                raise EngineError("the engine is shutting down")
            if self.pending >= self.max_queue:
                raise Busy("the engine is busy, try again")
            self.pending += 1
            state.queued += 1
            enqueue()

    def may_speculate(self, state: S) -> bool:
        """Room for a speculative prefill: the queue is not full and the
        conversation has no turn started or waiting."""
        with self.lock:
            return not (self.pending >= self.max_queue or state.running or state.queued)

    def stop(self, enqueue: Callable[[], None]) -> None:
        """Refuse further turns from now on, then `enqueue` (the worker's stop)."""
        with self.lock:
            self.stopping = True
            enqueue()

    def unqueue(self, turns: Iterable[TurnLike | QueuedEdit]) -> None:
        """These waiting turns leave the queue (started, cancelled or dropped);
        edits among them are not counted there."""
        with self.lock:
            for t in turns:
                if isinstance(t, QueuedEdit):
                    continue
                self.pending -= 1
                t.state.queued -= 1

    def admit_edit(self, enqueue: Callable[[], None]) -> None:
        """`enqueue` a history edit, atomically with `stop` (EngineError once
        stopping); edits do not count against `max_queue`."""
        with self.lock:
            if self.stopping:
                raise EngineError("the engine is shutting down")
            enqueue()

    # ------------------------------------------------------------- batching

    def promote(
        self,
        waiting: deque[T | QueuedEdit],
        active: list[T],
        start: Callable[[T], None],
        drop: Callable[[T], None],
        apply: Callable[[QueuedEdit], None] | None = None,
    ) -> None:
        """Move the waiting turns that may start now into `active` (marking their
        conversation running, then `start(t)`), in order; a cancelled turn that
        would be next of its conversation leaves with `drop(t)`; an edit whose
        conversation has no earlier turn running or waiting leaves with
        `apply(e)`; the rest wait."""
        blocked: set[int] = set()  # conversations with an earlier turn running or waiting
        keep: deque[T | QueuedEdit] = deque()
        while waiting:
            t = waiting.popleft()
            key = id(t.state)
            if isinstance(t, QueuedEdit):
                if key in blocked or t.state.running or apply is None:
                    blocked.add(key)
                    keep.append(t)
                else:
                    apply(t)
                continue
            if t.cancel_requested and key not in blocked:
                self.unqueue([t])
                drop(t)
                continue
            if key in blocked or t.state.running or self._full(active, t):
                blocked.add(key)
                keep.append(t)
                continue
            self.unqueue([t])
            t.state.running = True
            start(t)
            active.append(t)
            blocked.add(key)
        waiting.extend(keep)

    def _full(self, active: Sequence[TurnLike], t: TurnLike) -> bool:
        if len(active) >= self.max_batch:
            return True
        if not active:
            return False  # a lone turn always runs, whatever the budget
        reserved = sum(a.reserve() for a in active) + t.reserve()
        return self.over_budget(reserved * self.bytes_per_token)

    # ------------------------------------------------------------ KV budget

    def over_budget(self, used_bytes: int) -> bool:
        return self.kv_cache_budget > 0 and used_bytes > self.kv_cache_budget

    def touch(self, state: S) -> None:
        """`state` was just used: most recently used, if it holds a cache."""
        key = id(state)
        self._lru.pop(key, None)
        if state.cached_tokens() > 0:
            self._lru[key] = weakref.ref(state)

    def forget(self, state: S) -> None:
        self._lru.pop(id(state), None)

    def idle_states(self) -> list[S]:
        """Conversations holding a cache and running no turn, least recently used
        first (conversations that dropped theirs, or are gone, leave the LRU)."""
        out = []
        for key, ref in list(self._lru.items()):
            st = ref()
            if st is None or st.cached_tokens() == 0:
                del self._lru[key]
            elif not st.running:
                out.append(st)
        return out

    def cached_states(self) -> list[S]:
        """Every conversation in the LRU; safe to call from another thread while
        the worker changes it (then it may miss some, this once)."""
        try:
            refs = list(self._lru.values())
        except RuntimeError:  # changed during the copy
            return []
        return [st for st in (ref() for ref in refs) if st is not None]

    def enforce_budget(self, active_tokens: int) -> list[S]:
        """Drop least recently used idle caches while the running turns'
        `active_tokens` and the idle caches exceed the budget; the dropped."""
        if self.kv_cache_budget <= 0:
            return []
        per = self.bytes_per_token
        idle = self.idle_states()
        used = (active_tokens + sum(st.cached_tokens() for st in idle)) * per
        dropped: list[S] = []
        for st in idle:
            if not self.over_budget(used):
                break
            used -= st.cached_tokens() * per
            st.drop_cache()
            self.forget(st)
            self.evictions += 1
            dropped.append(st)
        return dropped
