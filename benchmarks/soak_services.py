"""What benchmarks/soak.py runs and breaks: a mosquitto broker, a PostgreSQL
server and `voice-agent serve`, each a child process on loopback that can be
restarted (or, for the engine worker, killed), and /proc readings of the
server (RSS, open file descriptors) and of its engine worker process."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

from benchmarks.traced_server import TRACED_SERVER

ROOT = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, timeout: float) -> bool:
    """Poll until 127.0.0.1:port accepts a connection (True) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return True
        time.sleep(0.05)
    return False


# -- /proc --------------------------------------------------------------------


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def open_fds(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the processes whose parent is `pid`."""
    out = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) != pid:
                continue
            child = int(Path(stat).parent.name)
            cmd = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
        out.append((child, cmd))
    return out


# -- mosquitto ------------------------------------------------------------------


class Mosquitto:
    """A loopback mosquitto on a fixed port, with persistence (as Debian's own
    configuration has it), restartable."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = directory / "mosquitto.conf"
        lines = [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {directory}/",
            "set_tcp_nodelay true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen(
            [exe, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        if not listening(self.port, 15):
            raise SystemExit("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def restart(self, down_s: float = 2.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


# -- PostgreSQL -----------------------------------------------------------------


class Postgres:
    """initdb in a temporary directory, postgres on a loopback port (fsync off),
    restartable (`pg_ctl restart -m fast`: connections are closed under the
    server). As root, initdb and postgres run as `postgres` (else `nobody`)."""

    user, password = "postgres", "soak-S3cret"

    def __init__(self) -> None:
        found = sorted(
            glob.glob("/usr/lib/postgresql/*/bin/initdb"),
            key=lambda p: int(Path(p).parents[1].name),
        )
        if not found:
            raise SystemExit("PostgreSQL is not installed (Debian package postgresql)")
        self.bindir = Path(found[-1]).parent
        # its own directory: the postgres user must be able to reach it
        self.base = Path(tempfile.mkdtemp(prefix="voice-agent-soak-pg-"))
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                entry = pwd.getpwnam("nobody")
            self.as_user = ["runuser", "-u", entry.pw_name, "--"]
            os.chown(self.base, entry.pw_uid, entry.pw_gid)
        self.data = self.base / "data"
        self.log = self.base / "server.log"
        self.port = free_port()
        self.url = f"postgresql://{self.user}:{quote(self.password)}@127.0.0.1:{self.port}/soak"

    def _run(self, *args: str) -> None:
        done = subprocess.run([*self.as_user, *args], capture_output=True, timeout=120)
        if done.returncode != 0:
            tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise SystemExit(f"{args[0]} failed: {done.stderr.decode(errors='replace')}\n{tail}")

    def init(self) -> None:
        pwfile = self.base / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            st = self.base.stat()
            os.chown(pwfile, st.st_uid, st.st_gid)
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
        )
        self.start()
        self._run(
            str(self.bindir / "psql"),
            "-h",
            str(self.base),
            "-p",
            str(self.port),
            "-U",
            self.user,
            "-c",
            "CREATE DATABASE soak",
        )

    def _ctl(self, *args: str) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), *args)

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.base} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._ctl("-o", options, "-l", str(self.log), "-w", "-t", "60", "start")

    def restart(self, down_s: float = 2.0) -> None:
        self._ctl("-m", "fast", "-w", "stop")
        time.sleep(down_s)
        self.start()

    def stop(self) -> None:
        if self.data.exists():
            with contextlib.suppress(subprocess.SubprocessError, OSError, SystemExit):
                self._ctl("-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


# -- the server -----------------------------------------------------------------


class Server:
    """`voice-agent serve` in a child process; its log in DIR/server.log."""

    def __init__(self, directory: Path, args: list[str], trace: Path | None = None) -> None:
        self.port = free_port()
        self.trace = trace  # tracemalloc in the server, driven by files (traced_server.py)
        self.directory = directory
        self.args = ["serve", "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.log_path = directory / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"ws://127.0.0.1:{self.port}/v1/realtime"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 180) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT_")}
        env["PYTHONPATH"] = str(ROOT)
        env["XDG_DATA_HOME"] = str(self.directory / "xdg")
        command = [sys.executable, "-m", "voice_agent.cli", *self.args]
        if self.trace is not None:
            env["VOICE_AGENT_BENCH_TRACE"] = str(self.trace)
            command = [sys.executable, "-c", TRACED_SERVER, *self.args]
        with self.log_path.open("wb") as out:
            self.proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.directory,
            )
        if not self.wait_ready(timeout):
            tail = self.log_path.read_text(errors="replace")[-3000:]
            self.stop()
            raise SystemExit(f"the server did not get ready:\n{tail}")

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/readyz", timeout=5) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def metric(self, name: str) -> float | None:
        """One unlabelled figure from the server's /metrics (None when absent
        or the server does not answer)."""
        try:
            url = f"http://127.0.0.1:{self.port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as r:
                body = r.read().decode(errors="replace")
        except OSError:
            return None
        for line in body.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return None

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                return False
            if self.ready():
                return True
            time.sleep(0.25)
        return False

    def worker_pid(self) -> int | None:
        """The engine worker process (multiprocessing spawn child), if running."""
        if self.proc is None:
            return None
        for pid, cmd in children(self.proc.pid):
            if "spawn_main" in cmd:
                return pid
        return None

    def kill_worker(self) -> int | None:
        pid = self.worker_pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pid

    def wait_new_worker(self, old: int | None, timeout: float = 120) -> bool:
        """Until a worker other than `old` runs and /readyz says ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = self.worker_pid()
            if pid is not None and pid != old and self.ready():
                return True
            time.sleep(0.25)
        return False

    def stop(self, timeout: float = 60) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)
