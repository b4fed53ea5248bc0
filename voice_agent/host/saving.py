"""One bounded queue of saves to the --db store, on one thread, for every transport.

`SaveQueue(store, max_pending=...)`: `submit(record)` queues a save of one
conversation (a store.StoredSession) and returns a future that resolves to
True once it is stored, False when it failed or was dropped (None without a
store). Saves run one at a time, in order, on the queue's one thread, so the
event loop never waits on the database.

When the store is slow or down, serving goes on and memory stays bounded:

- pending saves (submitted, not started) are at most `max_pending`;
- a newer save of a conversation that already has a pending save replaces
  it in its place (the newer copy holds everything the older one did); both
  futures resolve together (`replaced` counts these);
- when `max_pending` saves of other conversations wait, the oldest pending
  save is dropped (its future resolves False, `dropped` counts it, a warning
  is logged); that conversation's next save carries its turns again;
- a save that fails is counted (`errors`) and not retried (the next save of
  that conversation carries the same turns): the first failure of a run is
  logged with its traceback, later ones as one line each, and a success
  after failures logs that the store works again.

`await run(fn, *args)` runs a read (store.load, store.turns_of) on the same
thread once the saves pending at the call are done (so it sees this process's
own saves); its failure is counted in `errors` and raised. `prune()` queues
one store.prune behind the saves (at most one waits). `await wait_saved()`
waits until nothing is pending; `await close()` waits for that and stops the
thread (submit after close drops, counted). `families()` gives the counters
for /metrics: store_saves_total, store_errors_total,
store_saves_dropped_total, store_saves_replaced_total, store_saves_pending.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from voice_agent.metrics import Metric, counter, gauge

if TYPE_CHECKING:
    from voice_agent.store import StoredSession

logger = logging.getLogger("voice_agent.host")

T = TypeVar("T")

# Saves waiting for the store at most (one per conversation): a store that is
# down for a while costs at most this many conversation copies in memory.
MAX_PENDING_SAVES = 256


class StoreLike(Protocol):
    """What the host needs of store.Store (tests pass slow or failing ones)."""

    shared: bool

    def save(self, record: StoredSession) -> bool: ...

    def load(self, session_id: str) -> StoredSession | None: ...

    def turns_of(self, session_id: str) -> int | None: ...

    def prune(self) -> int: ...


@dataclass
class SaveStats:
    saved: int = 0  # saves the store took
    errors: int = 0  # saves and reads that failed
    dropped: int = 0  # pending saves dropped for a full queue (or after close)
    replaced: int = 0  # pending saves replaced by a newer one of the same conversation


@dataclass
class _Pending:
    record: StoredSession
    futures: list[asyncio.Future[bool]] = field(default_factory=list)


class SaveQueue:
    """The process's saves to the store; see the module doc."""

    def __init__(self, store: StoreLike | None, *, max_pending: int = MAX_PENDING_SAVES) -> None:
        self.store = store
        self.max_pending = max(1, max_pending)
        self.stats = SaveStats()
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
            if store is not None
            else None
        )
        self._pending: OrderedDict[str, _Pending] = OrderedDict()
        self._current: _Pending | None = None  # the save on the thread now
        self._worker: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._prune_queued = False
        self._failing = False
        self._closed = False

    @property
    def pending(self) -> int:
        """Saves waiting (not counting the one being written)."""
        return len(self._pending)

    # -- saves ----------------------------------------------------------------

    def submit(self, record: StoredSession) -> asyncio.Future[bool] | None:
        """Queue a save (see the module doc); None without a store."""
        if self.store is None:
            return None
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if self._closed:
            self.stats.dropped += 1
            logger.warning("save after close dropped", extra={"session_id": record.session_id})
            future.set_result(False)
            return future
        key = record.session_id
        entry = self._pending.get(key)
        if entry is not None:
            entry.record = record  # same place in the queue, the newest copy
            entry.futures.append(future)
            self.stats.replaced += 1
            return future
        if len(self._pending) >= self.max_pending:
            old_key, old = self._pending.popitem(last=False)
            self.stats.dropped += 1
            logger.warning(
                "store behind: oldest pending save dropped",
                extra={"session_id": old_key, "pending": len(self._pending)},
            )
            _settle(old.futures, False)
        self._pending[key] = _Pending(record, [future])
        if self._worker is None:
            self._worker = asyncio.create_task(self._drain(), name="store-saves")
        return future

    async def _drain(self) -> None:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                _, entry = self._pending.popitem(last=False)
                self._current = entry
                ok = False
                try:
                    error = await loop.run_in_executor(self._executor, self._save_now, entry.record)
                    ok = error is None
                    if error is not None:
                        self._failed("saving a conversation failed", entry.record.session_id, error)
                    else:
                        self._succeeded(entry.record.session_id)
                finally:
                    self._current = None
                    _settle(entry.futures, ok)
        finally:
            self._worker = None

    def _save_now(self, record: StoredSession) -> Exception | None:
        """On the store's thread: one save; its error, counted on the loop."""
        assert self.store is not None
        try:
            self.store.save(record)
        except Exception as exc:
            return exc
        return None

    def _succeeded(self, session_id: str) -> None:
        self.stats.saved += 1
        if self._failing:
            self._failing = False
            logger.info("the store works again", extra={"session_id": session_id})

    def _failed(self, what: str, session_id: str, exc: Exception) -> None:
        self.stats.errors += 1
        extra = {"session_id": session_id, "errors": self.stats.errors}
        if self._failing:  # one line each, no traceback per save while it is down
            logger.warning("%s: %s", what, type(exc).__name__, extra=extra)
        else:
            self._failing = True
            logger.error(what, exc_info=(type(exc), exc, exc.__traceback__), extra=extra)

    async def wait_saved(self) -> None:
        """Wait until no save is pending or being written."""
        while self._pending or self._current is not None:
            await asyncio.gather(*self._futures(), return_exceptions=True)

    def _futures(self) -> list[asyncio.Future[bool]]:
        entries = list(self._pending.values())
        if self._current is not None:
            entries.append(self._current)
        return [f for entry in entries for f in entry.futures]

    # -- reads and upkeep -------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the store's thread, after the saves pending now."""
        if self._executor is None:
            raise RuntimeError("no store")
        waiting = self._futures()
        if waiting:
            await asyncio.gather(*waiting, return_exceptions=True)
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except Exception as exc:
            key = str(args[0]) if args else ""
            self._failed("reading the store failed", key, exc)
            raise

    def prune(self) -> None:
        """Queue one store.prune behind the saves (at most one waits)."""
        store = self.store
        if store is None or self._closed or self._prune_queued:
            return
        self._prune_queued = True

        async def prune() -> None:
            try:
                await self.run(store.prune)
            except Exception:
                pass  # counted and logged by run()
            finally:
                self._prune_queued = False

        task = asyncio.create_task(prune(), name="store-prune")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Wait for the pending saves (before the caller closes the store), stop
        the thread. Idempotent."""
        self._closed = True
        await self.wait_saved()
        if self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    def families(self) -> list[Metric]:
        """The counters, for metrics.Metrics.add_collector."""
        st = self.stats
        return [
            counter("store_saves", "conversation saves the store took", st.saved),
            counter("store_errors", "store saves and reads that failed", st.errors),
            counter(
                "store_saves_dropped",
                "pending saves dropped because the store fell behind",
                st.dropped,
            ),
            counter(
                "store_saves_replaced",
                "pending saves replaced by a newer one of the same conversation",
                st.replaced,
            ),
            gauge("store_saves_pending", "saves waiting for the store", self.pending),
        ]


def _settle(futures: list[asyncio.Future[bool]], ok: bool) -> None:
    for future in futures:
        if not future.done():
            future.set_result(ok)
