"""A real mosquitto broker on a loopback port (Debian package `mosquitto`:
when it is missing the tests fail, they are never skipped)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .ports import wait_listening

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def require_mosquitto() -> None:
    """Fail (never skip) the test when mosquitto is not installed."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed (Debian package `mosquitto`)")


def write_passwords(path: Path, users: dict[str, str]) -> Path:
    """A mosquitto password file at `path` for `users` (name -> password), mode 0600."""
    path.write_text("")
    for user, password in users.items():
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", str(path), user, password],
            check=True,
            capture_output=True,
        )
    path.chmod(0o600)
    return path


def as_root_lines() -> list[str]:
    """Config lines that keep mosquitto running as root when the tests do (their
    temporary directories are not the mosquitto user's)."""
    return ["user root"] if os.geteuid() == 0 else []


def start_mosquitto(conf: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """`mosquitto -c conf`, once it listens on 127.0.0.1:port (up to 10 s);
    fails the test with the tail of `log` when it exits or does not listen."""
    proc = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    if wait_listening(port, 10.0, alive=lambda: proc.poll() is None):
        return proc
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)
        pytest.fail("mosquitto did not start listening within 10 s")
    tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
    pytest.fail(f"mosquitto exited with {proc.returncode}: {tail}")


def stop_mosquitto(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM: mosquitto saves its persistence file and exits."""
    if proc.poll() is None:
        proc.terminate()
        proc.wait(10)
