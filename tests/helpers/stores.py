"""Stores for the host tests: in memory, and one that fails or waits on demand."""

from __future__ import annotations

import copy
import threading

from voice_agent.store import StoredSession


class MemoryStore:
    """store.Store's interface on a dict; `fail` makes every call raise,
    `gate` (when set) holds each save until it is set, `started` is set when a
    save begins."""

    def __init__(self, *, shared: bool = False) -> None:
        self.shared = shared
        self.records: dict[str, StoredSession] = {}
        self.saved: list[str] = []  # session ids in the order they were saved
        self.fail = False
        self.gate: threading.Event | None = None
        self.started = threading.Event()
        self.prunes = 0

    def _check(self) -> None:
        if self.fail:
            raise OSError("the database is down")

    def save(self, record: StoredSession) -> bool:
        self.started.set()
        if self.gate is not None:
            self.gate.wait(30)
        self._check()
        self.records[record.session_id] = copy.deepcopy(record)
        self.saved.append(record.session_id)
        return True

    def load(self, session_id: str) -> StoredSession | None:
        self._check()
        record = self.records.get(session_id)
        return copy.deepcopy(record) if record is not None else None

    def turns_of(self, session_id: str) -> int | None:
        self._check()
        record = self.records.get(session_id)
        return record.history.turns if record is not None else None

    def prune(self) -> int:
        self._check()
        self.prunes += 1
        return 0
