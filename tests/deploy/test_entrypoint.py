"""deploy/entrypoint.sh as a plain command: flags go to `serve`, subcommands
and other commands run as given, mounted weights are used only when present,
and it serves the demo model when none is mounted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.ports import free_port
from tests.helpers.processes import stop_process

from .files import DEPLOY, ENTRYPOINT, instructions

VENV_BIN = Path(sys.executable).parent


def entrypoint_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MODEL_MOUNT"] = "/nonexistent/model"
    env.update(extra)
    return env


def run_entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env=entrypoint_env(**env),
        timeout=120,
    )


def test_entrypoint_flags_go_to_serve() -> None:
    done = run_entrypoint("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: voice-agent serve") and "--engine-url" in done.stdout


def test_entrypoint_runs_voice_agent_subcommands() -> None:
    done = run_entrypoint("sessions", "--help")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.startswith("usage: voice-agent sessions")
        and "{list,show,delete}" in done.stdout
    )
    top = run_entrypoint("help")
    assert top.returncode == 0 and "serve-model" in top.stdout
    unknown = run_entrypoint("no-such-subcommand")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_entrypoint_runs_other_commands_as_given() -> None:
    done = run_entrypoint("sh", "-c", "echo plain $0", "command")
    assert (done.returncode, done.stdout) == (0, "plain command\n")


def test_entrypoint_uses_mounted_weights_only_when_present(tmp_path: Path) -> None:
    def model_env(**env: str) -> list[str]:
        done = run_entrypoint("env", **env)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if line.startswith("VOICE_AGENT_MODEL=")]

    (tmp_path / "config.json").write_text("{}")
    assert model_env(MODEL_MOUNT=str(tmp_path)) == [f"VOICE_AGENT_MODEL={tmp_path}"]
    assert model_env(MODEL_MOUNT=str(tmp_path / "absent")) == []
    assert model_env(MODEL_MOUNT=str(tmp_path), VOICE_AGENT_MODEL="/m") == ["VOICE_AGENT_MODEL=/m"]
    assert model_env(VOICE_AGENT_MODEL="") == []  # empty means unset: the server falls back


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.mark.timeout(300)
def test_entrypoint_serves_with_no_model_mounted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No weights mounted, none in the Hugging Face cache: `serve` falls back to the demo
    model (here the prebuilt tiny one), answers /healthz and the image's HEALTHCHECK, and
    stops on SIGTERM."""
    port = free_port()
    env = entrypoint_env(
        VOICE_AGENT_HOST="127.0.0.1",
        VOICE_AGENT_PORT=str(port),
        VOICE_AGENT_DEMO_MODEL_DIR=str(tiny_model_dir),
        VOICE_AGENT_DB=str(tmp_path / "conversations.db"),
        VOICE_AGENT_TTS="none",
        VOICE_AGENT_LOG_FORMAT="json",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_for(path: str) -> dict[str, Any]:
        for _ in range(480):  # the tiny model loads: up to about 2 minutes
            assert proc.poll() is None, "the server exited early"
            try:
                status, body = get_json(f"http://127.0.0.1:{port}{path}")
            except OSError:
                status = 0
            if status == 200:
                return body
            time.sleep(0.25)
        pytest.fail(f"no 200 from {path}")

    try:
        assert wait_for("/healthz")["status"] == "ok"
        wait_for("/readyz")  # the model is loaded: the compose healthcheck passes
        health = wait_for("/healthz")
        assert health["demo_model"] is True, health

        # the image's own HEALTHCHECK command, run here against this server
        check = next(r for w, r in instructions(DEPLOY / "Dockerfile") if w == "HEALTHCHECK")
        command = json.loads(check[check.index("CMD") + 3 :])
        done = subprocess.run(
            [sys.executable, *command[1:]],
            env={**env, "VOICE_AGENT_PORT": str(port)},
            capture_output=True,
            timeout=30,
        )
        assert command[0] == "python" and done.returncode == 0, done.stderr

        assert stop_process(proc) == 0  # exec'd: the server itself gets SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
