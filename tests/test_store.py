"""The conversation store (SQLite and PostgreSQL), the sessions CLI, and
resuming across restarts. Tests taking `db` run against both databases (the
PostgreSQL one on the session's throwaway server, tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.helpers.ports import free_port
from tests.helpers.servers import project_env
from voice_agent.cli import main as cli_main
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.base import History, TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import ReplyDelta, ReplyDone
from voice_agent.store import Store, StoredSession, default_db_path, resolve_db
from voice_agent.transports.websocket import running_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty conversation database: a SQLite file, or a new database
    on the PostgreSQL server (its URL, password included)."""
    if request.param == "sqlite":
        return str(tmp_path / "db" / "c.db")
    return str(request.getfixturevalue("postgres_server").create_database())


def _is_sqlite(db: str) -> bool:
    return not db.startswith("postgresql://")


def _record(sid: str, turns: int = 1, clips: list[np.ndarray] | None = None) -> StoredSession:
    clips = clips if clips is not None else []
    return StoredSession(
        session_id=sid,
        owner="abc",
        device="kitchen",
        system_prompt="be brief",
        ids_used=(2, turns),
        history=History(
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "audio", "audio": "clip-1"}]},
                {"role": "assistant", "content": "héllo ☃"},
                {"role": "user", "content": [{"type": "text", "text": "and now?"}]},
                {"role": "assistant", "content": "done"},
            ],
            ids=[151644, 8948, 2**31 - 1, 0, 151645],
            clips=clips,
            clip_starts=[3] * len(clips),
            turns=turns,
        ),
    )


def test_save_load_round_trip_without_audio(db: str) -> None:
    store = Store(db)
    clip = np.linspace(-0.5, 0.5, 8000, dtype=np.float32)
    assert store.save(_record("s1", clips=[clip]))
    if _is_sqlite(db):
        mode = sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()
        assert mode == ("wal",)
    loaded = store.load("s1")
    assert loaded is not None
    assert (loaded.owner, loaded.device, loaded.system_prompt) == ("abc", "kitchen", "be brief")
    assert loaded.ids_used == (2, 1)
    assert loaded.history.ids == [151644, 8948, 2**31 - 1, 0, 151645]
    assert loaded.history.messages == _record("s1").history.messages
    # no audio stored: silence of the same length stands in for the clip
    assert store.count_clips("s1") == 0
    assert len(loaded.history.clips) == 1 and len(loaded.history.clips[0]) == 8000
    assert not loaded.history.clips[0].any()
    assert loaded.created <= loaded.updated
    assert store.load("nope") is None
    store.close()


def test_audio_is_stored_only_when_asked(db: str) -> None:
    store = Store(db, store_audio=True)
    clip = np.linspace(-0.5, 0.5, 8000, dtype=np.float32)
    store.save(_record("s1", clips=[clip]))
    store.save(_record("s1", turns=2, clips=[clip, clip[:100]]))  # appends the new clip only
    assert store.count_clips("s1") == 2
    loaded = store.load("s1")
    assert loaded is not None
    np.testing.assert_allclose(loaded.history.clips[0], clip, atol=1 / 16000)
    assert len(loaded.history.clips[1]) == 100
    assert store.delete("s1") and not store.delete("s1")
    assert store.count_clips("s1") == 0  # deleted with the conversation
    store.close()


def test_a_save_never_takes_turns_away(db: str) -> None:
    """A replica holding an older copy cannot overwrite the turns another
    replica added; `created` stays the first save's."""
    now = [1000.0]
    store = Store(db, clock=lambda: now[0])
    assert store.save(_record("s1", turns=3))
    now[0] += 10.0
    stale = _record("s1", turns=2)
    stale.history.messages = stale.history.messages[:3]
    assert not store.save(stale)
    loaded = store.load("s1")
    assert loaded is not None and loaded.history.turns == 3 and store.turns_of("s1") == 3
    assert len(loaded.history.messages) == 5 and loaded.updated == 1000.0
    now[0] += 10.0
    assert store.save(_record("s1", turns=4))
    loaded = store.load("s1")
    assert loaded is not None and loaded.history.turns == 4
    assert (loaded.created, loaded.updated) == (1000.0, 1020.0)
    assert store.turns_of("nope") is None
    store.close()


def test_retention_and_count_limits(db: str) -> None:
    now = [1_000_000.0]
    store = Store(db, retention_days=1.0, max_sessions=3, clock=lambda: now[0])
    for i in range(5):
        store.save(_record(f"s{i}"))
        now[0] += 3600.0
    assert store.prune() == 2  # only the 3 most recent are kept
    assert [s.session_id for s in store.list()] == ["s4", "s3", "s2"]
    now[0] += 86400.0 - 3 * 3600.0 + 1.0  # s2 is now older than a day
    assert store.prune() == 1
    assert [s.session_id for s in store.list()] == ["s4", "s3"]
    assert [s.turns for s in store.list(limit=1)] == [1]
    store.close()


def test_db_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert default_db_path() == tmp_path / "voice_agent" / "conversations.db"
    assert resolve_db("auto") == default_db_path()
    assert resolve_db("none") is None and resolve_db("") is None
    assert resolve_db(str(tmp_path / "x.db")) == tmp_path / "x.db"
    url = "postgresql://va:pw@db.example:5432/conversations"
    assert resolve_db(f" {url} ") == url  # a URL stays a URL (str, not Path)
    assert resolve_db("postgres://h/d") == "postgres://h/d"


def test_sessions_cli(db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = Store(db)
    store.save(_record("s1", clips=[np.zeros(24000, dtype=np.float32)]))
    store.save(_record("s2"))
    store.close()
    assert cli_main(["sessions", "list", "--db", str(db)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in out] == ["s2", "s1"]
    assert cli_main(["sessions", "show", "s1", "--db", str(db)]) == 0
    shown_text = capsys.readouterr().out
    assert "user: [audio 1.5 s]" in shown_text and "assistant: héllo ☃" in shown_text
    assert "user: and now?" in shown_text
    assert cli_main(["sessions", "show", "s1", "--json", "--db", str(db)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ids"][2] == 2**31 - 1 and shown["clip_samples"] == [24000]
    assert cli_main(["sessions", "delete", "s1", "--db", str(db)]) == 0
    capsys.readouterr()
    assert cli_main(["sessions", "show", "s1", "--db", str(db)]) == 2
    assert "no stored session s1" in capsys.readouterr().err
    assert cli_main(["sessions", "list", "--json", "--db", str(db)]) == 0
    assert [r["session_id"] for r in json.loads(capsys.readouterr().out)] == ["s2"]
    assert cli_main(["sessions", "list", "--db", str(tmp_path / "missing.db")]) == 2
    capsys.readouterr()


def echo(turn: TurnInput) -> str:
    return f"echo {turn.text}" if turn.text else "heard audio"


async def test_restarted_server_resumes_from_the_store(db: str) -> None:
    config = Config(port=0, token="tok", db=db)
    store = Store(config.db)
    async with running_server(config, ScriptedEngine(echo, token_delay=0.001), store=store) as app:
        async with RealtimeClient(app.url) as client:
            sid = (await client.start(token="tok", device="kitchen")).session_id
            await client.send_text("one")
            assert (await client.wait_for(ReplyDone, 20)).reply_id == "r1"
            await client.send_audio(bytes(3200))
            await client.commit()
            await client.send_text("two")
            assert (await client.wait_for(ReplyDone, 20)).text == "echo two"
        await app.wait_saved()
    store.close()

    store = Store(config.db)  # a new process would do just this
    engine = ScriptedEngine(echo, token_delay=0.001)
    async with running_server(config, engine, store=store) as app:
        async with RealtimeClient(app.url) as client:
            started = await client.start(token="tok", session_id=sid)
            assert started.session_id == sid
            await client.send_text("three")
            done = await client.wait_for(ReplyDone, 20)
            assert (done.reply_id, done.text) == ("r3", "echo three")  # numbering goes on
        conversation = engine.submitted[0][0]
        history = engine.history_text(conversation)
        assert history.index("echo one") < history.index("echo two") < history.index("three")
        assert app.limit_counters["sessions_restored_total"] == 1
    stored = store.load(sid)
    assert stored is not None and stored.device == "kitchen" and stored.history.turns == 3
    store.close()


async def test_resume_refused_for_another_token(db: str, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("alice\nbob\n")
    config = Config(port=0, tokens_file=str(tokens))
    store = Store(db)
    async with running_server(config, ScriptedEngine(echo, token_delay=0.001), store=store) as app:
        async with RealtimeClient(app.url) as client:
            sid = (await client.start(token="alice")).session_id
            await client.send_text("secret plans")
            await client.wait_for(ReplyDone, 20)
        await app.wait_saved()
        app.host.conversations.kept.clear()  # as after a restart: only the store knows it
        async with RealtimeClient(app.url) as bob:
            assert (await bob.start(token="bob", session_id=sid)).session_id != sid
        async with RealtimeClient(app.url) as alice:
            assert (await alice.start(token="alice", session_id=sid)).session_id == sid
    stored = store.load(sid)
    assert stored is not None and "alice" not in stored.owner  # a hash, not the token
    store.close()
    if _is_sqlite(db):
        files = list(Path(db).parent.glob("c.db*"))  # the database and its WAL
        assert files and all(b"alice" not in path.read_bytes() for path in files)
    else:
        import psycopg

        with psycopg.connect(db) as conn:
            rows = conn.execute("SELECT s::text FROM sessions s").fetchall()
        assert rows and all("alice" not in row[0] for row in rows)


SERVER = textwrap.dedent(
    """
    import sys
    from voice_agent.config import Config
    from voice_agent.engine.scripted import ScriptedEngine
    from voice_agent.logs import setup_logging
    from voice_agent.server import run

    def reply(turn):
        if turn.text and turn.text.startswith("long"):
            return " ".join(["w"] * int(turn.text.split()[1]))
        return f"echo {turn.text}"

    setup_logging("warning", "json")
    config = Config(port=int(sys.argv[1]), db=sys.argv[2], max_new_tokens=4000)
    run(config, ScriptedEngine(reply, token_delay=0.01))
    """
)


class _Server:
    """`voice_agent.server.run` in a subprocess on a free port."""

    def __init__(self, db: str | Path) -> None:
        self.port = free_port()
        self.db = db
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/realtime"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SERVER, str(self.port), str(self.db), env=project_env()
        )
        async with asyncio.timeout(60):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                    writer.close()
                    return
                except OSError:
                    await asyncio.sleep(0.1)

    async def stop(self, sig: signal.Signals) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return await asyncio.wait_for(self.proc.wait(), 60)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()


async def test_sigkill_loses_at_most_the_turn_in_flight(db: str) -> None:
    server = _Server(db)
    await server.start()
    try:
        async with RealtimeClient(server.url) as client:
            sid = (await client.start()).session_id
            for word in ("one", "two"):
                await client.send_text(word)
                assert (await client.wait_for(ReplyDone, 20)).text == f"echo {word}"
            await client.send_text("long 3000")  # 30 s: in flight when killed
            await client.wait_for(ReplyDelta, 20)
            assert await server.stop(signal.SIGKILL) == -signal.SIGKILL
        server = _Server(db)
        await server.start()
        async with RealtimeClient(server.url) as client:
            assert (await client.start(session_id=sid)).session_id == sid
            await client.send_text("three")
            done = await client.wait_for(ReplyDone, 20)
            assert (done.reply_id, done.text) == ("r3", "echo three")
        assert await server.stop(signal.SIGTERM) == 0
    finally:
        server.kill()
    stored = Store(db).load(sid)
    assert stored is not None
    texts = [m["content"] for m in stored.history.messages if m["role"] == "assistant"]
    assert texts == ["echo one", "echo two", "echo three"]  # only the killed turn is gone


async def test_sigterm_drains_and_saves(tmp_path: Path) -> None:
    db = tmp_path / "c.db"
    server = _Server(db)
    await server.start()
    try:
        async with RealtimeClient(server.url) as a, RealtimeClient(server.url) as b:
            sid_a = (await a.start()).session_id
            sid_b = (await b.start()).session_id
            await a.send_text("long 100")  # about 1 s: finishes within the drain
            await b.send_text("long 3000")  # 30 s: cancelled at the end of the drain
            await a.wait_for(ReplyDelta, 20)
            await b.wait_for(ReplyDelta, 20)
            assert await server.stop(signal.SIGTERM) == 0
            assert await a.wait_closed(20) == 1001
            assert await b.wait_closed(20) == 1001
            assert (await a.wait_for(ReplyDone, 1)).text.count("w") == 100
            assert not b.of_type(ReplyDone)
    finally:
        server.kill()
    store = Store(db)
    stored_a, stored_b = store.load(sid_a), store.load(sid_b)
    assert stored_a is not None and stored_b is not None
    assert stored_a.history.messages[-1]["content"].count("w") == 100
    kept = stored_b.history.messages[-1]["content"].count("w")
    assert 0 < kept < 3000  # the part that was sent stays in the history


def test_config_validates_the_new_limits() -> None:
    from voice_agent.errors import ConfigError

    for bad in (
        {"send_queue": 0},
        {"max_connections_per_client": 0},
        {"max_messages_per_second": 0},
        {"max_audio_speed": -1},
        {"idle_timeout": -1},
        {"tls_cert": "c.pem"},
    ):
        with pytest.raises(ConfigError):
            replace(Config(), **bad)  # type: ignore[arg-type]
