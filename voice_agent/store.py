"""Conversations kept in a database, so a reconnect, a restart or another
gateway replica resumes them.

`--db` picks the database: a SQLite file (default `auto`:
`$XDG_DATA_HOME/voice_agent/conversations.db`, that is
~/.local/share/voice_agent/conversations.db; `none` keeps nothing), or a
PostgreSQL server, `postgresql://user@host:port/dbname` (also `postgres://`;
the `postgres` extra, psycopg 3), which every gateway replica shares.

Both hold the same schema and behave the same: one `Store` class holds the
logic and the SQL, and a small backend (`_SQLite`, `_Postgres`) opens the
connection, names the column types and runs transactions. Each save is one
committed transaction, an upsert that keeps the row's `created` time.
SQLite runs in WAL mode with synchronous=NORMAL: a killed process (SIGKILL)
loses at most the turn in flight; only a power loss can lose the last few
commits. PostgreSQL is safe with concurrent writers (several replicas): the
upsert never regresses a conversation (a save with fewer turns than the
stored row is dropped, so a replica holding a stale copy cannot overwrite
the turns another replica added), clips are inserted by (session, number),
the schema is created under an advisory lock, and one prune runs at a time
(another replica's concurrent prune is skipped). A broken connection is
reopened and the operation retried once. The password of the URL is never
logged or shown (`Store.location`).

Per conversation: the owner (a hash of the token that opened it, never the
token), the device name, the system prompt, created/updated times, the
(utterance, reply) numbering, and the engine's history: ChatML messages (the
text of every turn), the token ids and where each audio clip's tokens start.
Audio is stored only with `--store-audio` (int16 PCM per clip); without it, a
conversation rebuilt from the database hears silence of the same length in
place of each old clip (the ids, and so the replies' text, stay exact).

Retention: conversations not updated for `retention_days` are deleted, and
beyond `max_sessions` the least recently updated go first (`prune`, run at
start-up and whenever a session ends).

The class is synchronous and thread-safe (one connection, one lock); the
server calls it from one worker thread so the event loop never waits on the
database.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np

from voice_agent.engine.base import History
from voice_agent.errors import ConfigError

if TYPE_CHECKING:
    import psycopg

SAMPLE_RATE = 16000

logger = logging.getLogger("voice_agent.store")

T = TypeVar("T")

# The same tables in both databases; the backend names the column types.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    session_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL DEFAULT '',
    device TEXT,
    system_prompt TEXT,
    created {real} NOT NULL,
    updated {real} NOT NULL,
    turns INTEGER NOT NULL DEFAULT 0,
    ids_used TEXT NOT NULL DEFAULT '[0, 0]',
    messages TEXT NOT NULL DEFAULT '[]',
    ids {blob} NOT NULL DEFAULT {empty_blob},
    clip_starts TEXT NOT NULL DEFAULT '[]',
    clip_samples TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS sessions_updated ON sessions (updated);
CREATE TABLE IF NOT EXISTS clips (
    session_id TEXT NOT NULL REFERENCES sessions (session_id) ON DELETE CASCADE,
    n INTEGER NOT NULL,
    pcm {blob} NOT NULL,
    PRIMARY KEY (session_id, n)
);
"""

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

_POSTGRES_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(value: str | Path) -> bool:
    """Whether a `--db` value names a PostgreSQL server."""
    return isinstance(value, str) and value.strip().lower().startswith(_POSTGRES_SCHEMES)


def default_db_path() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "voice_agent" / "conversations.db"


def resolve_db(value: str) -> str | Path | None:
    """The `--db` value as a store target: a PostgreSQL URL as it is, `auto`
    the default SQLite path, `none` (or empty) None, anything else a path."""
    if value.strip().lower() in ("", "none"):
        return None
    if is_postgres_url(value):
        return value.strip()
    if value == "auto":
        return default_db_path()
    return Path(value).expanduser()


def _url_secrets(url: str) -> list[str]:
    """The passwords a URL carries (in its user info or a `password=`
    parameter), as spelt in the URL and percent-decoded."""
    userinfo = url.partition("://")[2].split("/", 1)[0].rpartition("@")[0]
    raw = [userinfo.partition(":")[2]] if ":" in userinfo else []
    raw += re.findall(r"(?i)(?:[?&])password=([^&#]*)", url)
    return [s for r in raw for s in {r, unquote(r)} if s]


def redact_url(url: str) -> str:
    """The URL with its password replaced by `***` (for logs and messages)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostport = netloc.rpartition("@")
            netloc = f"{userinfo.split(':', 1)[0]}:***@{hostport}"
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return "<unparsable database URL>"


def _scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


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


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class _Backend(abc.ABC):
    """What differs between the databases: connecting, column types,
    placeholders, transactions and locks. SQL is written with `?` placeholders."""

    location: str  # for logs and messages: the path, or the URL without its password
    shared = False  # other processes (gateway replicas) write to it too
    real = "REAL"
    blob = "BLOB"
    empty_blob = "x''"
    # errors after which the operation is retried once (after `reset`)
    transient: tuple[type[Exception], ...] = ()

    def schema(self) -> list[str]:
        script = _SCHEMA.format(real=self.real, blob=self.blob, empty_blob=self.empty_blob)
        return [s.strip() for s in script.split(";") if s.strip()]

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor: ...

    @abc.abstractmethod
    def transaction(self) -> contextlib.AbstractContextManager[None]: ...

    def describe(self, exc: BaseException) -> str:
        """An error's message, without secrets."""
        return str(exc).strip()

    def try_lock(self, key: int) -> bool:
        """Take a lock held until the transaction ends; False when another holds it."""
        return True

    def reset(self) -> None:  # noqa: B027 (optional hook)
        """After a transient error: reconnect if the connection is broken."""

    @abc.abstractmethod
    def close(self) -> None: ...


class _SQLite(_Backend):
    """One file in WAL mode; the file lock serialises writers."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.location = str(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=5000")
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"cannot open the conversation database {path}: {exc}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        return self._db.execute(sql, params)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._db:  # commits, or rolls back on an exception
            yield

    def close(self) -> None:
        self._db.close()


class _Postgres(_Backend):
    """A PostgreSQL server shared by every gateway replica (psycopg 3, sync)."""

    shared = True
    real = "DOUBLE PRECISION"
    blob = "BYTEA"
    empty_blob = "''"

    def __init__(self, url: str) -> None:
        self.location = redact_url(url)
        self._secrets = _url_secrets(url)
        try:
            import psycopg
            from psycopg.conninfo import conninfo_to_dict
        except ImportError:
            raise ConfigError(
                f"--db {self.location}: PostgreSQL needs psycopg "
                "(pip install 'voice-agent[postgres]')"
            ) from None
        self._psycopg = psycopg
        self.transient = (psycopg.OperationalError,)
        try:
            given = conninfo_to_dict(url)
        except psycopg.Error as exc:
            raise ConfigError(f"bad --db URL {self.location}: {self.describe(exc)}") from None
        self._params: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in given:
            self._params["connect_timeout"] = 10
        if "application_name" not in given:
            self._params["application_name"] = "voice_agent"
        if "options" not in given:
            # A stuck statement (a lock held elsewhere, a failing disk) fails
            # that save or load after this long instead of holding the store's
            # thread forever; `options=-c statement_timeout=...` in the URL
            # sets another.
            self._params["options"] = f"-c statement_timeout={STATEMENT_TIMEOUT_MS}"
        self._url = url
        self._conn = self._connect()

    def describe(self, exc: BaseException) -> str:
        return _scrub(str(exc).strip(), self._secrets)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return self._psycopg.connect(self._url, **self._params)
        except self._psycopg.Error as exc:
            raise ConfigError(
                f"cannot open the conversation database {self.location}: {self.describe(exc)}"
            ) from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        return self._conn.execute(sql.replace("?", "%s"), params)  # type: ignore[arg-type]

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._conn.transaction():
            yield

    def try_lock(self, key: int) -> bool:
        row = self._conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (key,)).fetchone()
        return bool(row and row[0])

    def lock(self, key: int) -> None:
        self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))

    def reset(self) -> None:
        if self._conn.closed or self._conn.broken:
            logger.warning("conversation database connection lost; reconnecting")
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = self._connect()

    def close(self) -> None:
        self._conn.close()


STATEMENT_TIMEOUT_MS = 10_000  # PostgreSQL: per statement, unless the URL sets options


def _open_backend(target: str | Path) -> _Backend:
    if is_postgres_url(target):
        return _Postgres(str(target).strip())
    return _SQLite(Path(target))


class Store:
    """See the module doc. `target`: a SQLite path or a PostgreSQL URL."""

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
        self._backend = _open_backend(target)
        self.location = self._backend.location
        self.shared = self._backend.shared
        self.path = self._backend.path if isinstance(self._backend, _SQLite) else None
        try:
            self._run(self._create_schema)
        except Exception as exc:
            self._backend.close()
            raise ConfigError(
                f"cannot open the conversation database {self.location}: "
                f"{self._backend.describe(exc)}"
            ) from None

    def _create_schema(self, db: _Backend) -> None:
        if isinstance(db, _Postgres):  # replicas starting together
            db.lock(_SCHEMA_LOCK)
        for statement in db.schema():
            db.execute(statement)

    def _run(self, op: Callable[[_Backend], T]) -> T:
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

        def op(db: _Backend) -> bool:
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
        def op(db: _Backend) -> bool:
            cur = db.execute("DELETE FROM sessions WHERE session_id = ?", (session_id,))
            return cur.rowcount > 0

        return self._run(op)

    def prune(self) -> int:
        """Apply the retention limits; the number of conversations deleted
        (0 when another replica is pruning the shared database just now)."""

        def op(db: _Backend) -> int:
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
        def op(db: _Backend) -> tuple[Any, dict[int, bytes]] | None:
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

        def op(db: _Backend) -> int | None:
            row = db.execute(
                "SELECT turns FROM sessions WHERE session_id = ?", (session_id,)
            ).fetchone()
            return None if row is None else int(row[0])

        return self._run(op)

    def list(self, limit: int = 100) -> list[SessionSummary]:
        """The most recently updated conversations first."""

        def op(db: _Backend) -> list[Any]:
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
        def op(db: _Backend) -> int:
            row = db.execute(
                "SELECT COUNT(*) FROM clips WHERE session_id = ?", (session_id,)
            ).fetchone()
            return int(row[0])

        return self._run(op)


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
