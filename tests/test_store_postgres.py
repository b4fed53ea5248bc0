"""The PostgreSQL conversation store (voice_agent/store/, `--db postgresql://...`):
gateway replicas sharing it, concurrent writers, reconnecting, secrets.

The server is the session's throwaway PostgreSQL (tests/conftest.py); the
cases both databases share are in test_store.py."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import psycopg
import pytest

from tests.helpers.paths import ROOT
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.base import History, TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import ConfigError
from voice_agent.protocol import ReplyDone
from voice_agent.server import open_store
from voice_agent.store import Store, StoredSession, redact_url
from voice_agent.transports.websocket import running_server

if TYPE_CHECKING:
    from tests.helpers.postgres import PostgresServer

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def url(postgres_server: PostgresServer) -> str:
    return postgres_server.create_database()


def echo(turn: TurnInput) -> str:
    return f"echo {turn.text}" if turn.text else "heard audio"


async def _turn(client: RealtimeClient, text: str) -> ReplyDone:
    await client.send_text(text)
    return await client.wait_for(ReplyDone, 20)


async def test_a_conversation_resumes_on_another_gateway(url: str, tmp_path: Path) -> None:
    """Two gateways (replicas: own engine, own connection) share one database."""
    tokens = tmp_path / "tokens"
    tokens.write_text("tok\nother\n")
    config = Config(port=0, tokens_file=str(tokens), db=url)
    store1, store2 = Store(url), Store(url)
    engine1, engine2 = (ScriptedEngine(echo, token_delay=0.001) for _ in range(2))
    async with (
        running_server(config, engine1, store=store1) as gw1,
        running_server(config, engine2, store=store2) as gw2,
    ):
        async with RealtimeClient(gw1.url) as client:
            sid = (await client.start(token="tok", device="kitchen")).session_id
            assert (await _turn(client, "one")).reply_id == "r1"
            assert (await _turn(client, "two")).text == "echo two"
        await gw1.wait_saved()

        async with RealtimeClient(gw2.url) as client:  # the load balancer picked gw2
            assert (await client.start(token="tok", session_id=sid)).session_id == sid
            done = await _turn(client, "three")
            assert (done.reply_id, done.text) == ("r3", "echo three")  # numbering goes on
        history = engine2.history_text(engine2.submitted[-1][0])
        assert history.index("echo one") < history.index("echo two") < history.index("three")
        assert gw2.limit_counters["sessions_restored_total"] == 1
        await gw2.wait_saved()

        # back on gw1, which still holds its own (now stale) copy in memory:
        # it must pick up the turn gw2 added
        async with RealtimeClient(gw1.url) as client:
            assert (await client.start(token="tok", session_id=sid)).session_id == sid
            done = await _turn(client, "four")
            assert (done.reply_id, done.text) == ("r4", "echo four")
        assert "echo three" in engine1.history_text(engine1.submitted[-1][0])
        await gw1.wait_saved()

        async with RealtimeClient(gw2.url) as client:  # another token: a new session
            assert (await client.start(token="other", session_id=sid)).session_id != sid
    stored = Store(url).load(sid)
    assert stored is not None and stored.device == "kitchen" and stored.history.turns == 4
    texts = [m["content"] for m in stored.history.messages if m["role"] == "assistant"]
    assert texts == ["echo one", "echo two", "echo three", "echo four"]
    store1.close()
    store2.close()


def _record(sid: str, turns: int, writer: int) -> StoredSession:
    return StoredSession(
        session_id=sid,
        owner="o",
        ids_used=(turns, turns),
        history=History(
            messages=[{"role": "assistant", "content": f"w{writer} t{turns}"}],
            ids=list(range(turns)),
            clips=[np.zeros(160, dtype=np.float32)] * turns,
            clip_starts=[0] * turns,
            turns=turns,
        ),
    )


def test_concurrent_writers(url: str) -> None:
    """Replicas saving the same new conversation at once (an upsert, not a
    unique-key error), each their own ones, and pruning, all together."""
    writers, rounds = 4, 15
    stores = [Store(url, store_audio=True, max_sessions=1000) for _ in range(writers)]
    barrier = threading.Barrier(writers)
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            store = stores[w]
            for turns in range(1, rounds + 1):
                barrier.wait(10)  # all writers hit the shared row together
                store.save(_record("shared", turns, w))
                store.save(_record(f"own-{w}", turns, w))
                if turns % 5 == 0:
                    store.prune()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    check = Store(url)
    shared = check.load("shared")
    assert shared is not None and shared.history.turns == rounds
    assert shared.history.ids == list(range(rounds))
    assert check.count_clips("shared") == rounds  # each clip once
    assert sorted(s.session_id for s in check.list()) == sorted(
        ["shared", *(f"own-{w}" for w in range(writers))]
    )
    for w in range(writers):
        own = check.load(f"own-{w}")
        assert own is not None and own.history.messages[0]["content"] == f"w{w} t{rounds}"
    for store in [*stores, check]:
        store.close()


def test_a_dropped_connection_is_reopened(url: str, postgres_server: PostgresServer) -> None:
    store = Store(url)
    store.save(_record("s1", 1, 0))
    dbname = url.rsplit("/", 1)[1]
    with psycopg.connect(postgres_server.url(), autocommit=True) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name = 'voice_agent'",
            (dbname,),
        ).fetchall()
    assert killed == [(True,)]
    assert store.save(_record("s1", 2, 0))  # retried on a new connection
    loaded = store.load("s1")
    assert loaded is not None and loaded.history.turns == 2
    store.close()


def test_the_password_is_never_shown(
    url: str, postgres_server: PostgresServer, caplog: pytest.LogCaptureFixture
) -> None:
    secret = postgres_server.password
    caplog.set_level(logging.DEBUG)
    config = Config(db=url)
    assert secret not in repr(config)
    store = open_store(config)
    assert store is not None and store.shared
    assert secret not in store.location and ":***@" in store.location
    store.close()
    wrong = postgres_server.url(url.rsplit("/", 1)[1], password="Wr0ng-pw-42")
    with pytest.raises(ConfigError) as refused:
        Store(wrong)
    assert "password authentication failed" in str(refused.value)
    assert "Wr0ng-pw-42" not in str(refused.value)
    with pytest.raises(ConfigError) as unreachable:
        Store("postgresql://u:Hidden-pw-7@127.0.0.1:1/db?connect_timeout=2")
    assert "Hidden-pw-7" not in str(unreachable.value)
    assert secret not in caplog.text and "Wr0ng-pw-42" not in caplog.text
    assert redact_url("postgres://u@h/d?password=x1&sslmode=require") == (
        "postgres://u@h/d?password=***&sslmode=require"
    )


def test_without_psycopg_a_postgresql_url_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"voice-agent\[postgres\]"):
        Config(db="postgresql://u:pw@127.0.0.1/db")
    with pytest.raises(ConfigError, match=r"voice-agent\[postgres\]") as caught:
        Store("postgres://u:pw@127.0.0.1/db")
    assert ":pw@" not in str(caught.value)


def test_the_core_does_not_import_psycopg(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from voice_agent.config import Config\n"
        "from voice_agent.server import open_store\n"
        f"store = open_store(Config(db={str(tmp_path / 'c.db')!r}))\n"
        "assert store is not None and not store.shared\n"
        "print('psycopg' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_statements_have_a_timeout(url: str) -> None:
    """A statement stuck on a lock or a slow disk fails after the timeout
    (10 s by default) instead of holding the store's thread forever; the URL's
    own options win."""
    from voice_agent.store import STATEMENT_TIMEOUT_MS

    store = Store(url)
    try:
        row = store._backend.execute("SHOW statement_timeout").fetchone()  # type: ignore[attr-defined]
        assert row is not None and row[0] == f"{STATEMENT_TIMEOUT_MS // 1000}s"
    finally:
        store.close()
    sep = "&" if "?" in url else "?"
    short = Store(f"{url}{sep}options=-c%20statement_timeout%3D300")
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            short._backend.execute("SELECT pg_sleep(2)")  # type: ignore[attr-defined]
    finally:
        short.close()
