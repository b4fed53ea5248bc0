"""The database backends: what differs between SQLite and PostgreSQL
(connecting, column types, placeholders, transactions, locks), and the
schema both hold."""

from __future__ import annotations

import abc
import contextlib
import logging
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from voice_agent.errors import ConfigError
from voice_agent.store.targets import is_postgres_url, redact_url, scrub, url_secrets

if TYPE_CHECKING:
    import psycopg

logger = logging.getLogger("voice_agent.store")

# The same tables in both databases; the backend names the column types.
SCHEMA = """
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


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Backend(abc.ABC):
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
        script = SCHEMA.format(real=self.real, blob=self.blob, empty_blob=self.empty_blob)
        return [s.strip() for s in script.split(";") if s.strip()]

    @abc.abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor: ...

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


class SQLiteBackend(Backend):
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

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        return self._db.execute(sql, params)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        with self._db:  # commits, or rolls back on an exception
            yield

    def close(self) -> None:
        self._db.close()


class PostgresBackend(Backend):
    """A PostgreSQL server shared by every gateway replica (psycopg 3, sync)."""

    shared = True
    real = "DOUBLE PRECISION"
    blob = "BYTEA"
    empty_blob = "''"

    def __init__(self, url: str) -> None:
        self.location = redact_url(url)
        self._secrets = url_secrets(url)
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
        return scrub(str(exc).strip(), self._secrets)

    def _connect(self) -> psycopg.Connection[Any]:
        try:
            return self._psycopg.connect(self._url, **self._params)
        except self._psycopg.Error as exc:
            raise ConfigError(
                f"cannot open the conversation database {self.location}: {self.describe(exc)}"
            ) from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
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


def open_backend(target: str | Path) -> Backend:
    if is_postgres_url(target):
        return PostgresBackend(str(target).strip())
    return SQLiteBackend(Path(target))
