"""Conversations kept in a database, so a reconnect, a restart or another
gateway replica resumes them.

`--db` picks the database: a SQLite file (default `auto`:
`$XDG_DATA_HOME/voice_agent/conversations.db`, that is
~/.local/share/voice_agent/conversations.db; `none` keeps nothing), or a
PostgreSQL server, `postgresql://user@host:port/dbname` (also `postgres://`;
the `postgres` extra, psycopg 3), which every gateway replica shares.

Both hold the same schema and behave the same: one `Store` class (store.py)
holds the logic and the SQL, and a small backend (backends.py:
`SQLiteBackend`, `PostgresBackend`) opens the connection, names the column
types and runs transactions. Each save is one committed transaction, an
upsert that keeps the row's `created` time.
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

from voice_agent.store.backends import STATEMENT_TIMEOUT_MS
from voice_agent.store.records import SessionSummary, StoredSession, render_messages
from voice_agent.store.store import Store
from voice_agent.store.targets import default_db_path, is_postgres_url, redact_url, resolve_db

__all__ = [
    "STATEMENT_TIMEOUT_MS",
    "SessionSummary",
    "Store",
    "StoredSession",
    "default_db_path",
    "is_postgres_url",
    "redact_url",
    "render_messages",
    "resolve_db",
]
