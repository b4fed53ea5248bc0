"""Store: the logic and the SQL shared by both databases (see the package doc)."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from voice_agent.engine.types import History
from voice_agent.errors import ConfigError
from voice_agent.store.backends import Backend, PostgresBackend, SQLiteBackend, open_backend
from voice_agent.store.records import SessionSummary, StoredSession

logger = logging.getLogger("voice_agent.store")

T = TypeVar("T")


# One transaction per save: insert, or update everything but `created`; a
# save with fewer turns than the stored row (a stale copy on another replica)
# changes nothing.
_UPSERT = (
    "INSERT INTO sessions (session_id, owner, device, system_prompt, created, updated, "
    "turns, ids_used, messages, ids, clip_starts, clip_samples) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (session_id) DO UPDATE SET owner = excluded.owner, "
    "device = excluded.device, system_prompt = excluded.system_prompt, "
    "updated = excluded.updated, turns = excluded.turns, ids_used = excluded.ids_used, "
    "messages = excluded.messages, ids = excluded.ids, clip_starts = excluded.clip_starts, "
    "clip_samples = excluded.clip_samples "
    "WHERE sessions.turns <= excluded.turns"
)
_INSERT_CLIP = (
    "INSERT INTO clips (session_id, n, pcm) VALUES (?, ?, ?) "
    "ON CONFLICT (session_id, n) DO UPDATE SET pcm = excluded.pcm"
)

# PostgreSQL advisory lock keys (transaction-scoped): creating the schema, pruning.
_SCHEMA_LOCK = 0x766F_6963_6501
_PRUNE_LOCK = 0x766F_6963_6502


class Store:
    """See the package doc. `target`: a SQLite path or a PostgreSQL URL."""

    def __init__(
        self,
        target: str | Path,
        *,
        store_audio: bool = False,
        retention_days: float = 30.0,
        max_sessions: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store_audio = store_audio
        self.retention_days = retention_days
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        self._backend = open_backend(target)
        self.location = self._backend.location
        self.shared = self._backend.shared
        self.path = self._backend.path if isinstance(self._backend, SQLiteBackend) else None
        try:
            self._run(self._create_schema)
        except Exception as exc:
            self._backend.close()
            raise ConfigError(
                f"cannot open the conversation database {self.location}: "
                f"{self._backend.describe(exc)}"
            ) from None

    def _create_schema(self, db: Backend) -> None:
        if isinstance(db, PostgresBackend):  # replicas starting together
            db.lock(_SCHEMA_LOCK)
        for statement in db.schema():
            db.execute(statement)

    def _run(self, op: Callable[[Backend], T]) -> T:
        """`op` in one transaction, under the lock; retried once after a
        transient error (a dropped connection, a deadlock)."""
        with self._lock:
            for attempt in range(2):
                try:
                    with self._backend.transaction():
                        return op(self._backend)
                except self._backend.transient as exc:
                    if attempt:
                        raise
                    logger.warning("conversation database error, retrying: %s", type(exc).__name__)
                    self._backend.reset()
        raise AssertionError("unreachable")

    def close(self) -> None:
        with self._lock:
            self._backend.close()

    # -- writing ------------------------------------------------------------

    def save(self, record: StoredSession) -> bool:
        """Insert or update one conversation (one transaction). False: the
        stored row has more turns (another replica carried the conversation
        on), so this older copy is not kept."""
        h = record.history
        now = self._clock()
        ids = np.asarray(h.ids, dtype="<i4").tobytes()
        samples = [len(c) for c in h.clips]
        row = (
            record.session_id,
            record.owner,
            record.device,
            record.system_prompt,
            record.created or now,
            now,
            h.turns,
            json.dumps(list(record.ids_used)),
            json.dumps(h.messages),
            ids,
            json.dumps(h.clip_starts),
            json.dumps(samples),
        )

        def op(db: Backend) -> bool:
            if db.execute(_UPSERT, row).rowcount == 0:
                return False
            if self.store_audio:
                have = db.execute(
                    "SELECT COUNT(*) FROM clips WHERE session_id = ?", (record.session_id,)
                ).fetchone()[0]
                for n, clip in enumerate(h.clips[have:], start=have):
                    pcm = (np.clip(np.asarray(clip), -1.0, 1.0) * 32767).astype("<i2").tobytes()
                    db.execute(_INSERT_CLIP, (record.session_id, n, pcm))
            return True

        saved = self._run(op)
        if not saved:
            logger.warning(
                "not saved: the stored conversation has more turns (carried on elsewhere)",
                extra={"session_id": record.session_id},
            )
        return saved

    def delete(self, session_id: str) -> bool:
        def op(db: Backend) -> bool:
            cur = db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            return cur.rowcount > 0

        return self._run(op)

    def prune(self) -> int:
        """Apply the retention limits; the number of conversations deleted
        (0 when another replica is pruning the shared database just now)."""

        def op(db: Backend) -> int:
            if not db.try_lock(_PRUNE_LOCK):
                return 0
            deleted = 0
            if self.retention_days > 0:
                cutoff = self._clock() - self.retention_days * 86400.0
                deleted += db.execute("DELETE FROM sessions WHERE updated < ?", (cutoff,)).rowcount
            cur = db.execute(
                "DELETE FROM sessions WHERE session_id NOT IN (SELECT session_id FROM sessions "
                "ORDER BY updated DESC LIMIT ?)",
                (self.max_sessions,),
            )
            return deleted + cur.rowcount

        return self._run(op)

    # -- reading ------------------------------------------------------------

    def load(self, session_id: str) -> StoredSession | None:
        def op(db: Backend) -> tuple[Any, dict[int, bytes]] | None:
            row = db.execute(
                "SELECT owner, device, system_prompt, created, updated, turns, ids_used, "
                "messages, ids, clip_starts, clip_samples FROM sessions WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            clips = db.execute("SELECT n, pcm FROM clips WHERE session_id = ?", (session_id,))
            return row, {int(n): bytes(pcm) for n, pcm in clips.fetchall()}

        found = self._run(op)
        if found is None:
            return None
        row, stored = found
        owner, device, prompt, created, updated, turns, used, messages, ids, starts, samples = row
        clips = []
        for n, count in enumerate(json.loads(samples)):
            pcm = stored.get(n)
            if pcm is not None and len(pcm) == 2 * count:
                clips.append(np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0)
            else:  # not stored: silence of the same length keeps the ids exact
                clips.append(np.zeros(int(count), dtype=np.float32))
        u, r = json.loads(used)
        return StoredSession(
            session_id=session_id,
            owner=owner,
            device=device,
            system_prompt=prompt,
            created=float(created),
            updated=float(updated),
            ids_used=(int(u), int(r)),
            history=History(
                messages=json.loads(messages),
                ids=[int(x) for x in np.frombuffer(bytes(ids), dtype="<i4")],
                clips=clips,
                clip_starts=[int(x) for x in json.loads(starts)],
                turns=int(turns),
            ),
        )

    def turns_of(self, session_id: str) -> int | None:
        """The stored conversation's turn count (None: not stored): cheaper
        than `load`, to tell whether another replica carried it on."""

        def op(db: Backend) -> int | None:
            row = db.execute(
                "SELECT turns FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            return None if row is None else int(row[0])

        return self._run(op)

    def list(self, limit: int = 100) -> list[SessionSummary]:
        """The most recently updated conversations first."""

        def op(db: Backend) -> list[Any]:
            return db.execute(
                "SELECT session_id, device, created, updated, turns FROM sessions "
                "ORDER BY updated DESC LIMIT ?",
                (limit,),
            ).fetchall()

        return [
            SessionSummary(sid, device, float(created), float(updated), int(turns))
            for sid, device, created, updated, turns in self._run(op)
        ]

    def count_clips(self, session_id: str) -> int:
        def op(db: Backend) -> int:
            row = db.execute(
                "SELECT COUNT(*) FROM clips WHERE session_id = ?", (session_id,)
            ).fetchone()
            return int(row[0])

        return self._run(op)
