"""Conversations kept in SQLite, so a reconnect or a restart resumes them.

One file (`--db`, default `$XDG_DATA_HOME/voice_agent/conversations.db`, that
is ~/.local/share/voice_agent/conversations.db; `none` keeps nothing) in WAL
mode with synchronous=NORMAL: each save is one committed transaction, so a
killed process (SIGKILL) loses at most the turn in flight; only a power loss
can lose the last few commits.

Per conversation: the owner (a hash of the token that opened it, never the
token), the device name, the system prompt, created/updated times, the
(utterance, reply) numbering, and the engine's history: ChatML messages (the
text of every turn), the token ids and where each audio clip's tokens start.
Audio is stored only with `--store-audio` (int16 PCM per clip); without it, a
conversation rebuilt from the file hears silence of the same length in place
of each old clip (the ids, and so the replies' text, stay exact).

Retention: conversations not updated for `retention_days` are deleted, and
beyond `max_sessions` the least recently updated go first (`prune`, run at
start-up and whenever a session ends).

The class is synchronous and thread-safe (one connection, one lock); the
server calls it from one worker thread so the event loop never waits on disk.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.engine.base import History
from voice_agent.errors import ConfigError

SAMPLE_RATE = 16000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    device TEXT,
    system_prompt TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    ids_used TEXT NOT NULL DEFAULT '[0, 0]',
    messages TEXT NOT NULL DEFAULT '[]',
    ids BLOB NOT NULL DEFAULT x'',
    clip_starts TEXT NOT NULL DEFAULT '[]',
    clip_samples TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated);
CREATE TABLE IF NOT EXISTS clips (
    session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    pcm BLOB NOT NULL,
    PRIMARY KEY (session_id, n)
);
"""


def default_db_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "voice_agent" / "conversations.db"


def resolve_db(value: str) -> Path | None:
    """The `--db` value as a path: `auto` is the default path, `none` (or empty) None."""
    if value.strip().lower() in ("", "none"):
        return None
    if value == "auto":
        return default_db_path()
    return Path(value).expanduser()


@dataclass
class StoredSession:
    """One stored conversation."""

    session_id: str
    owner: str = ""
    device: str | None = None
    system_prompt: str | None = None
    created: float = 0.0
    updated: float = 0.0
    ids_used: tuple[int, int] = (0, 0)
    history: History = field(default_factory=History)


@dataclass(frozen=True)
class SessionSummary:
    session_id: str
    device: str | None
    created: float
    updated: float
    turns: int


class Store:
    """See the module doc."""

    def __init__(
        self,
        path: str | Path,
        *,
        store_audio: bool = False,
        retention_days: float = 30.0,
        max_sessions: int = 10000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.store_audio = store_audio
        self.retention_days = retention_days
        self.max_sessions = max_sessions
        self._clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(self.path), check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._db.commit()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the conversation database {self.path}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- writing ------------------------------------------------------------

    def save(self, record: StoredSession) -> None:
        """Insert or replace one conversation (one transaction)."""
        h = record.history
        now = self._clock()
        ids = np.asarray(h.ids, dtype="<i4").tobytes()
        samples = [len(c) for c in h.clips]
        with self._lock, self._db:
            row = self._db.execute(
                "SELECT created FROM sessions WHERE session_id = ?", (record.session_id,)
            ).fetchone()
            created = row[0] if row else (record.created or now)
            self._db.execute(
                "INSERT OR REPLACE INTO sessions (session_id, owner, device, system_prompt, "
                "created, updated, turns, ids_used, messages, ids, clip_starts, clip_samples) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.session_id,
                    record.owner,
                    record.device,
                    record.system_prompt,
                    created,
                    now,
                    h.turns,
                    json.dumps(list(record.ids_used)),
                    json.dumps(h.messages),
                    ids,
                    json.dumps(h.clip_starts),
                    json.dumps(samples),
                ),
            )
            if self.store_audio:
                have = self._db.execute(
                    "SELECT COUNT(*) FROM clips WHERE session_id = ?", (record.session_id,)
                ).fetchone()[0]
                for n, clip in enumerate(h.clips[have:], start=have):
                    pcm = (np.clip(np.asarray(clip), -1.0, 1.0) * 32767).astype("<i2").tobytes()
                    self._db.execute(
                        "INSERT OR REPLACE INTO clips (session_id, n, pcm) VALUES (?, ?, ?)",
                        (record.session_id, n, pcm),
                    )

    def delete(self, session_id: str) -> bool:
        with self._lock, self._db:
            cur = self._db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            return cur.rowcount > 0

    def prune(self) -> int:
        """Apply the retention limits; the number of conversations deleted."""
        deleted = 0
        with self._lock, self._db:
            if self.retention_days > 0:
                cutoff = self._clock() - self.retention_days * 86400.0
                cur = self._db.execute("DELETE FROM sessions WHERE updated < ?", (cutoff,))
                deleted += cur.rowcount
            cur = self._db.execute(
                "DELETE FROM sessions WHERE session_id IN (SELECT session_id FROM sessions "
                "ORDER BY updated DESC LIMIT -1 OFFSET ?)",
                (self.max_sessions,),
            )
            deleted += cur.rowcount
        return deleted

    # -- reading ------------------------------------------------------------

    def load(self, session_id: str) -> StoredSession | None:
        with self._lock:
            row = self._db.execute(
                "SELECT owner, device, system_prompt, created, updated, turns, ids_used, "
                "messages, ids, clip_starts, clip_samples FROM sessions WHERE session_id = ?",
                (session_id,),
            ).fetchone()
            if row is None:
                return None
            stored = dict(
                self._db.execute(
                    "SELECT n, pcm FROM clips WHERE session_id = ?", (session_id,)
                ).fetchall()
            )
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
            created=created,
            updated=updated,
            ids_used=(int(u), int(r)),
            history=History(
                messages=json.loads(messages),
                ids=[int(x) for x in np.frombuffer(ids, dtype="<i4")],
                clips=clips,
                clip_starts=[int(x) for x in json.loads(starts)],
                turns=int(turns),
            ),
        )

    def list(self, limit: int = 100) -> list[SessionSummary]:
        """The most recently updated conversations first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT session_id, device, created, updated, turns FROM sessions "
                "ORDER BY updated DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [SessionSummary(*row) for row in rows]

    def count_clips(self, session_id: str) -> int:
        with self._lock:
            row = self._db.execute(
                "SELECT COUNT(*) FROM clips WHERE session_id = ?", (session_id,)
            ).fetchone()
        return int(row[0])


def render_messages(messages: list[dict[str, Any]], clip_samples: list[int]) -> list[str]:
    """One line per message, `role: text`, audio items as `[audio N.N s]`."""
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            text = content
        else:
            parts = []
            for part in content or []:
                if part.get("type") == "audio":
                    tail = str(part.get("audio", "")).rsplit("-", 1)[-1]
                    n = int(tail) - 1 if tail.isdigit() else -1
                    seconds = clip_samples[n] / SAMPLE_RATE if 0 <= n < len(clip_samples) else 0
                    parts.append(f"[audio {seconds:.1f} s]")
                elif part.get("type") == "text":
                    parts.append(str(part.get("text", "")))
            text = " ".join(parts)
        lines.append(f"{message.get('role', '?')}: {text}")
    return lines
