"""scripts/system-deps on faked machines: a PATH of stub binaries only (so the
real apt-get and sudo are never found), SYSTEM_DEPS_ROOT for the fixed system
paths (/usr/bin/chromium, /usr/sbin, /usr/lib/postgresql/*/bin) and
SYSTEM_DEPS_EUID for the root check. The stubs write their arguments to a log;
the stub apt-get "installs" by creating the stub binaries of each package."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "system-deps"
TEST_PACKAGES = ["sox", "libsox-fmt-mp3", "espeak-ng", "chromium", "mosquitto", "postgresql"]

SOX_HELP = (
    "SoX v14.4.2\n\nAUDIO FILE FORMATS: 8svx aif flac mp2 {mp3}ogg wav\nPLAYLIST FORMATS: m3u\n"
)
# Where each package puts its binaries, relative to the fake root (bin: on PATH).
FILES = {
    "sox": ["bin/sox", "bin/soxi"],
    "espeak-ng": ["bin/espeak-ng"],
    "chromium": ["root/usr/bin/chromium"],
    "mosquitto": ["root/usr/sbin/mosquitto", "bin/mosquitto_passwd"],
    "postgresql": [
        "root/usr/lib/postgresql/15/bin/initdb",
        "root/usr/lib/postgresql/15/bin/pg_ctl",
    ],
}


def stub(path: Path, body: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name
    path.write_text(f'#!/bin/sh\necho "{name} $*" >> "$STUB_LOG"\n{body}')
    path.chmod(0o755)


def install_package(base: Path, package: str) -> None:
    """What apt-get installing `package` leaves behind on the fake machine."""
    if package == "libsox-fmt-mp3":
        (base / "mp3").touch()
        return
    for rel in FILES.get(package, []):
        if rel == "bin/sox":
            mp3 = f"$([ -e {base}/mp3 ] && echo 'mp3 ')"
            stub(base / rel, f'[ "$1" = -h ] && echo "{SOX_HELP.format(mp3=mp3)}"\nexit 0\n')
        else:
            stub(base / rel)


@dataclass
class Machine:
    base: Path
    euid: int = 0

    @property
    def log(self) -> Path:
        return self.base / "calls.log"

    def calls(self, name: str) -> list[str]:
        if not self.log.exists():
            return []
        lines = self.log.read_text().splitlines()
        return [line.split(" ", 1)[1] for line in lines if line.split(" ", 1)[0] == name]

    def with_apt_get(self) -> None:
        """An apt-get that logs its arguments and installs the stubs of each package."""
        script = Path(__file__).resolve()
        installer = f'"{sys.executable}" "{script}" install "{self.base}"'
        stub(self.base / "bin" / "apt-get", f'[ "$1" = install ] && {installer} "$@"\nexit 0\n')

    def with_sudo(self, *, passwordless: bool) -> None:
        """A sudo that logs its arguments. Passwordless: `-n true` succeeds and any
        other command runs (its VAR=value words dropped); else it always fails."""
        runs = 'shift; while case "$1" in *=*) true;; *) false;; esac; do shift; done; exec "$@"'
        body = f'[ "$2" = true ] && exit 0\n{runs}\n' if passwordless else "exit 1\n"
        stub(self.base / "bin" / "sudo", body)

    def run(self, which: str = "test") -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": str(self.base / "bin"),  # stubs only: never the real apt-get
            "STUB_LOG": str(self.log),
            "SYSTEM_DEPS_ROOT": str(self.base / "root"),
            "SYSTEM_DEPS_EUID": str(self.euid),
            "VENV": str(ROOT / ".venv"),  # exists: the venv check passes
            "PYTHON": sys.executable,
        }
        assert "/usr" not in env["PATH"]
        return subprocess.run(
            [sys.executable, str(SCRIPT), which],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )


@pytest.fixture
def machine(tmp_path: Path) -> Machine:
    (tmp_path / "bin").mkdir()
    (tmp_path / "root").mkdir()
    return Machine(tmp_path)


def install_all(machine: Machine, *, but: tuple[str, ...] = ()) -> None:
    for package in TEST_PACKAGES:
        if package not in but:
            install_package(machine.base, package)


def test_all_present_does_nothing(machine: Machine) -> None:
    install_all(machine)
    machine.with_apt_get()
    machine.with_sudo(passwordless=True)
    done = machine.run()
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert machine.calls("apt-get") == [] and machine.calls("sudo") == []
    assert machine.calls("sox") == ["-h"]  # the MP3 check


def test_run_needs_no_debian_package(machine: Machine) -> None:
    machine.with_apt_get()  # nothing of the test set is installed
    done = machine.run("run")
    assert (done.returncode, done.stderr) == (0, "")
    assert machine.calls("apt-get") == []


def test_missing_as_root_installs_exactly_the_missing_packages(machine: Machine) -> None:
    install_all(machine, but=("espeak-ng", "chromium", "postgresql"))
    machine.with_apt_get()
    done = machine.run()
    assert done.returncode == 0, done.stderr
    assert machine.calls("apt-get") == ["update", "install -y espeak-ng chromium postgresql"]
    assert machine.calls("sudo") == []
    assert machine.run().returncode == 0 and len(machine.calls("apt-get")) == 2  # now all there


def test_mp3_support_alone_is_a_missing_package(machine: Machine) -> None:
    install_all(machine, but=("libsox-fmt-mp3",))
    machine.with_apt_get()
    assert machine.run().returncode == 0
    assert machine.calls("apt-get") == ["update", "install -y libsox-fmt-mp3"]


def test_missing_with_passwordless_sudo_installs_through_sudo(machine: Machine) -> None:
    machine.euid = 1000
    install_all(machine, but=("mosquitto",))
    machine.with_apt_get()
    machine.with_sudo(passwordless=True)
    done = machine.run()
    assert done.returncode == 0, done.stderr
    apt = str(machine.base / "bin" / "apt-get")
    assert machine.calls("sudo") == [
        "-n true",
        f"-n DEBIAN_FRONTEND=noninteractive {apt} update",
        f"-n DEBIAN_FRONTEND=noninteractive {apt} install -y mosquitto",
    ]
    assert machine.calls("apt-get") == ["update", "install -y mosquitto"]


@pytest.mark.parametrize("sudo", ["none", "password"])
def test_missing_without_root_prints_one_command_and_stops(machine: Machine, sudo: str) -> None:
    machine.euid = 1000
    install_all(machine, but=("sox", "libsox-fmt-mp3", "mosquitto"))
    machine.with_apt_get()
    if sudo == "password":
        machine.with_sudo(passwordless=False)
    done = machine.run()
    assert done.returncode != 0 and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    command = "sudo apt-get update && sudo apt-get install -y sox libsox-fmt-mp3 mosquitto"
    assert lines[0].endswith(f"run: {command}")
    assert "sox, soxi (sox)" in lines[0] and "mosquitto, mosquitto_passwd" in lines[0]
    assert machine.calls("apt-get") == []
    assert machine.calls("sudo") == ([] if sudo == "none" else ["-n true"])


def test_without_apt_get_names_what_is_missing(machine: Machine) -> None:
    install_all(machine, but=("chromium", "postgresql"))
    done = machine.run()
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.splitlines()) == 1 and "Traceback" not in done.stderr
    assert "/usr/bin/chromium (chromium)" in done.stderr
    assert "initdb, pg_ctl (postgresql)" in done.stderr
    assert "no apt-get" in done.stderr


def test_failing_apt_get_stops_with_non_zero(machine: Machine) -> None:
    install_all(machine, but=("espeak-ng",))
    stub(machine.base / "bin" / "apt-get", "exit 100\n")
    done = machine.run()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "espeak-ng" in done.stderr.splitlines()[-1]


def test_a_python_without_ensurepip_needs_python3_venv(machine: Machine) -> None:
    install_all(machine)
    machine.with_apt_get()
    stub(machine.base / "bin" / "python3", "exit 1\n")  # like Debian's without python3-venv
    env = {
        "PATH": str(machine.base / "bin"),
        "STUB_LOG": str(machine.log),
        "SYSTEM_DEPS_ROOT": str(machine.base / "root"),
        "SYSTEM_DEPS_EUID": "1000",
        "VENV": str(machine.base / "no-venv-yet"),
        "PYTHON": str(machine.base / "bin" / "python3"),
    }
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "run"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert done.stderr.strip().endswith("sudo apt-get install -y python3-venv")


def test_usage_and_list() -> None:
    bad = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stderr
    listing = subprocess.run(
        [sys.executable, str(SCRIPT), "--list", "test"], capture_output=True, text=True, check=True
    )
    packages = [line.split("\t")[0] for line in listing.stdout.splitlines()]
    assert packages == ["python3-venv", *TEST_PACKAGES]


if __name__ == "__main__":  # the stub apt-get's installer: install BASE install -y PKG...
    _, _, base, *args = sys.argv
    for name in args:
        if not name.startswith("-") and name != "install":
            install_package(Path(base), name)


def test_readme_names_every_package_before_the_quick_start() -> None:
    listing = subprocess.run(
        [sys.executable, str(SCRIPT), "--list", "test"], capture_output=True, text=True, check=True
    )
    opening = (ROOT / "README.md").read_text(encoding="utf-8").split("## Quick start")[0]
    for line in listing.stdout.splitlines():
        assert f"`{line.split(chr(9))[0]}`" in opening, line
