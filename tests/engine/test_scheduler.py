"""The engine's scheduler on its own: admission, batching, KV budget and LRU (no model)."""

from __future__ import annotations

import gc
import subprocess
import sys
from collections import deque
from dataclasses import dataclass, field

import pytest

from voice_agent.engine.qwen2_audio.scheduler import (
    CHARS_PER_TEXT_TOKEN,
    SAMPLES_PER_AUDIO_TOKEN,
    TEMPLATE_TOKENS,
    QueuedEdit,
    Scheduler,
    pick_prefill_rows,
    reserve_tokens,
)
from voice_agent.errors import Busy, EngineError


@dataclass(eq=False)
class Conv:
    cache: int = 0  # tokens in its cache
    running: bool = False
    queued: int = 0

    def cached_tokens(self) -> int:
        return self.cache

    def drop_cache(self) -> None:
        self.cache = 0


@dataclass(eq=False)
class Turn:
    state: Conv
    tokens: int = 10  # its reserve
    cancel_requested: bool = False

    def reserve(self) -> int:
        return self.tokens


@dataclass
class Log:
    started: list[Turn] = field(default_factory=list)
    dropped: list[Turn] = field(default_factory=list)


def sched(**kw: int) -> Scheduler[Conv]:
    kw.setdefault("max_queue", 8)
    kw.setdefault("max_batch", 4)
    kw.setdefault("kv_cache_budget", 0)
    s: Scheduler[Conv] = Scheduler(**kw)
    s.bytes_per_token = 2
    return s


def submit(s: Scheduler[Conv], waiting: deque[Turn], t: Turn) -> None:
    s.admit(t.state, lambda: waiting.append(t))


def promote(s: Scheduler[Conv], waiting: deque[Turn], active: list[Turn]) -> Log:
    log = Log()
    s.promote(waiting, active, log.started.append, log.dropped.append)
    return log


# ----------------------------------------------------------------- admission


def test_admission_bounded_by_max_queue_and_counts_per_conversation() -> None:
    s, waiting, conv = sched(max_queue=2), deque[Turn](), Conv()
    submit(s, waiting, Turn(conv))
    submit(s, waiting, Turn(conv))
    with pytest.raises(Busy):
        submit(s, waiting, Turn(conv))
    assert (s.pending, conv.queued, len(waiting)) == (2, 2, 2)
    assert not s.may_speculate(Conv())  # the queue is full
    s.unqueue([waiting.popleft()])
    assert (s.pending, conv.queued) == (1, 1)
    assert s.may_speculate(Conv()) and not s.may_speculate(conv)  # conv has a turn waiting


def test_nothing_admitted_once_stopping() -> None:
    s, stopped = sched(), []
    s.stop(lambda: stopped.append(True))
    with pytest.raises(EngineError, match="shutting down"):
        s.admit(Conv(), lambda: None)
    assert stopped == [True] and s.pending == 0


# ------------------------------------------------------------------ batching


def test_turns_start_in_order_up_to_max_batch() -> None:
    s, waiting, active = sched(max_batch=2), deque[Turn](), list[Turn]()
    turns = [Turn(Conv()) for _ in range(3)]
    for t in turns:
        submit(s, waiting, t)
    log = promote(s, waiting, active)
    assert log.started == active == turns[:2] and list(waiting) == turns[2:]
    assert all(t.state.running for t in turns[:2]) and not turns[2].state.running
    assert s.pending == 1 and [t.state.queued for t in turns] == [0, 0, 1]


def test_one_conversation_runs_one_turn_at_a_time_others_overtake() -> None:
    s, waiting, active = sched(), deque[Turn](), list[Turn]()
    a, b = Conv(), Conv()
    a1, a2, b1 = Turn(a), Turn(a), Turn(b)
    for t in (a1, a2, b1):
        submit(s, waiting, t)
    assert promote(s, waiting, active).started == [a1, b1]
    assert list(waiting) == [a2]
    active.remove(a1)
    a.running = False  # a1 ended
    assert promote(s, waiting, active).started == [a2]


@dataclass(eq=False)
class Edit(QueuedEdit):
    state: Conv


def test_an_edit_waits_for_its_conversations_earlier_turns_and_holds_later_ones() -> None:
    s, waiting, active = sched(max_queue=2), deque[Turn | QueuedEdit](), list[Turn]()
    a, b = Conv(), Conv()
    a1, a2, b1 = Turn(a), Turn(a), Turn(b)
    edit_a, edit_b = Edit(a), Edit(b)
    applied: list[QueuedEdit] = []
    submit(s, waiting, a1)
    s.admit_edit(lambda: waiting.append(edit_a))
    submit(s, waiting, a2)
    with pytest.raises(Busy):  # the edit is not counted: the two turns are
        submit(s, waiting, b1)
    s.admit_edit(lambda: waiting.append(edit_b))
    s.promote(waiting, active, lambda t: None, lambda t: None, applied.append)
    assert active == [a1] and applied == [edit_b] and list(waiting) == [edit_a, a2]
    active.remove(a1)
    a.running = False  # a1 ended
    s.promote(waiting, active, lambda t: None, lambda t: None, applied.append)
    assert applied == [edit_b, edit_a] and active == [a2] and not waiting
    s.unqueue([edit_a])  # edits are never counted
    assert s.pending == 0
    s.stop(lambda: None)
    with pytest.raises(EngineError):
        s.admit_edit(lambda: None)


def test_cancelled_turn_dropped_unless_an_earlier_one_of_its_conversation_waits() -> None:
    s, waiting, active = sched(max_batch=1), deque[Turn](), list[Turn]()
    a, b = Conv(), Conv()
    blocker, a1, a2, b1 = Turn(Conv()), Turn(a), Turn(a, cancel_requested=True), Turn(b)
    for t in (blocker, a1, a2, b1):
        submit(s, waiting, t)
    b1.cancel_requested = True
    log = promote(s, waiting, active)
    assert log.started == [blocker]
    assert log.dropped == [b1]  # a2 waits behind a1: it must end after a1 does
    assert list(waiting) == [a1, a2] and s.pending == 2 and b.queued == 0


def test_kv_budget_holds_turns_back_but_a_lone_turn_always_runs() -> None:
    # 2 bytes a token: a budget of 100 bytes is 50 tokens.
    s, waiting, active = sched(kv_cache_budget=100), deque[Turn](), list[Turn]()
    big, small, smaller = Turn(Conv(), 60), Turn(Conv(), 30), Turn(Conv(), 20)
    for t in (big, small, smaller):
        submit(s, waiting, t)
    assert promote(s, waiting, active).started == [big]  # over the budget, but alone
    assert list(waiting) == [small, smaller]
    active.clear()
    assert promote(s, waiting, active).started == [small, smaller]  # 50 tokens fit


def test_reserve_estimate_before_and_after_prefill() -> None:
    est = reserve_tokens(
        history_tokens=100,
        audio_samples=16000 * 2,
        text_chars=10,
        max_new_tokens=64,
    )
    audio = 16000 * 2 // SAMPLES_PER_AUDIO_TOKEN
    assert audio == 50  # 25 audio tokens a second
    assert est == 100 + audio + 8 + 10 // CHARS_PER_TEXT_TOKEN + TEMPLATE_TOKENS + 64
    no_audio = reserve_tokens(history_tokens=0, audio_samples=None, text_chars=0, max_new_tokens=1)
    assert no_audio == TEMPLATE_TOKENS + 1
    measured = reserve_tokens(
        prompt_tokens=321, history_tokens=100, audio_samples=1, text_chars=99, max_new_tokens=9
    )
    assert measured == 330


@pytest.mark.parametrize(
    ("sizes", "tokens", "slots", "rows"),
    [
        ([(0, 100)] * 5, 8192, 16384, [0, 1, 2, 3, 4]),
        ([(0, 100)] * 5, 250, 16384, [0, 1]),  # 3 x 100 new tokens > 250
        ([(0, 9000)], 8192, 16384, [0]),  # a lone turn is never held back
        ([(0, 50), (0, 500), (0, 60)], 200, 16384, [0, 2]),  # the big one waits, a small joins
        ([(1000, 10), (3000, 10), (0, 10)], 8192, 4000, [0, 2]),  # slots: 2 x (3000 + 10)
        ([], 8192, 16384, []),
    ],
)
def test_prefill_rows_within_bounds(
    sizes: list[tuple[int, int]], tokens: int, slots: int, rows: list[int]
) -> None:
    assert pick_prefill_rows(sizes, tokens, slots) == rows


# ----------------------------------------------------------- KV budget, LRU


def test_lru_evicts_least_recently_used_idle_caches_until_under_budget() -> None:
    s = sched(kv_cache_budget=200)  # 100 tokens
    old, mid, new, busy = Conv(40), Conv(40), Conv(40), Conv(40, running=True)
    for c in (old, mid, busy, new):
        s.touch(c)
    s.touch(old)  # used again: now the most recent
    # (30 running + 120 idle tokens) x 2 = 300 bytes: drop mid, the least recently
    # used idle one (220), then new (140 fits); busy runs a turn: never dropped.
    dropped = s.enforce_budget(active_tokens=30)
    assert dropped == [mid, new]
    assert (mid.cache, new.cache, old.cache, busy.cache) == (0, 0, 40, 40)
    assert s.evictions == 2
    assert s.idle_states() == [old]  # busy is in the LRU but not idle
    assert set(map(id, s.cached_states())) == {id(old), id(busy)}


def test_no_budget_no_eviction() -> None:
    s = sched(kv_cache_budget=0)
    c = Conv(10**6)
    s.touch(c)
    assert s.enforce_budget(10**9) == [] and c.cache == 10**6


def test_lru_forgets_dropped_and_collected_conversations() -> None:
    s = sched()
    kept, dropped, gone = Conv(5), Conv(5), Conv(5)
    for c in (kept, dropped, gone):
        s.touch(c)
    dropped.drop_cache()
    del gone, c  # the last references
    gc.collect()
    assert s.idle_states() == [kept]
    assert s.cached_states() == [kept]
    empty = Conv(0)
    s.touch(empty)  # no cache: not in the LRU
    assert s.cached_states() == [kept]


def test_scheduler_imports_no_torch() -> None:
    code = (
        "import sys\n"
        "import voice_agent.engine.qwen2_audio.scheduler\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
