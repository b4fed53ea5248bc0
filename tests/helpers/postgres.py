"""A throwaway PostgreSQL server on a loopback port (the `postgres_server`
fixture in tests/conftest.py starts one per run)."""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

from .ports import free_port


class PostgresServer:
    """A running server: URLs to it and new empty databases on it."""

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


def postgres_bin() -> Path | None:
    """The directory of the newest Debian PostgreSQL (/usr/lib/postgresql/N/bin)."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found.sort(key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if found:
        return found[-1]
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextlib.contextmanager
def running_postgres(bindir: Path) -> Iterator[PostgresServer]:
    """initdb in a temp dir, postgres on a free 127.0.0.1 port with its socket
    in that dir and fsync off, stopped and removed on the way out. initdb and
    postgres refuse to run as root: as root they run as `postgres` (else
    `nobody`) through runuser. RuntimeError (with the server log) when it
    cannot start."""
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
    port = free_port()
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
