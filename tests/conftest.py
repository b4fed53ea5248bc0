"""Fixtures shared by every test package."""

from __future__ import annotations

import functools
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest


@pytest.fixture(autouse=True)
def _private_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conversation store's default file (--db auto) lives under
    $XDG_DATA_HOME: point it at the test's own directory, never the user's."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random Qwen2-Audio (real classes, save_pretrained), made once per run."""
    from voice_agent.engine.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    """../shared/audio: real recordings for tests (see its README.md)."""
    return Path(__file__).resolve().parents[1].parent / "shared" / "audio"


class PostgresServer:
    """A throwaway PostgreSQL server on a loopback port (see `postgres_server`)."""

    user = "postgres"  # the bootstrap superuser
    password = "pg-S3cret+pass"  # scram-sha-256 over TCP: the URL's password is used

    def __init__(self, port: int) -> None:
        self.port = port
        self._databases = 0

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        secret = quote(self.password if password is None else password, safe="")
        return f"postgresql://{self.user}:{secret}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self) -> str:
        """A new empty database; its URL."""
        import psycopg

        self._databases += 1
        name = f"test_{self._databases}_{os.getpid()}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _postgres_bin() -> Path | None:
    """The directory of the newest Debian PostgreSQL (/usr/lib/postgresql/N/bin)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the whole run (Debian's `postgresql`
    package; skipped only when its binaries are missing): initdb in a temp
    dir, postgres on a free 127.0.0.1 port with its socket in that dir and
    fsync off, stopped at the end. initdb and postgres refuse to run as root:
    as root they run as `postgres` (else `nobody`) through runuser."""
    bindir = _postgres_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (apt-get install postgresql)")
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="voice-agent-pg-"))
    if os.geteuid() == 0:
        name = "postgres"
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            name, entry = "nobody", pwd.getpwnam("nobody")
        as_user = ["runuser", "-u", name, "--"]
        os.chown(base, entry.pw_uid, entry.pw_gid)
    data, pwfile, log = base / "data", base / "pwfile", base / "server.log"
    pwfile.write_text(PostgresServer.password + "\n")
    if as_user:
        os.chown(pwfile, entry.pw_uid, entry.pw_gid)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=120)
    options = (
        f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={base} "
        "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
    )
    try:
        run(
            [
                *as_user,
                str(bindir / "initdb"),
                "-D",
                str(data),
                "-U",
                PostgresServer.user,
                f"--pwfile={pwfile}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]
        )
        pg_ctl = [*as_user, str(bindir / "pg_ctl"), "-D", str(data)]
        run([*pg_ctl, "-o", options, "-l", str(log), "-w", "-t", "60", "start"])
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(base, ignore_errors=True)
        detail = exc.stderr.decode(errors="replace") if exc.stderr else ""
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"cannot start PostgreSQL: {detail}\n{tail}") from None
    try:
        yield PostgresServer(port)
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)
