"""The `voice-agent` command line as a child process: start it, wait until it
answers over HTTP, stop it the way an operator would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from typing import IO, Any

import aiohttp
import pytest


def cli_process(*args: str, log: IO[str], **env: str) -> subprocess.Popen[str]:
    """`voice-agent ARGS` (the console script's module) with stdout and stderr
    in `log`; the environment is this one without VOICE_AGENT_* plus `env`."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT_")}
    return subprocess.Popen(
        [sys.executable, "-m", "voice_agent.cli", *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**base, **env},
        text=True,
    )


async def until_http_ok(
    http: aiohttp.ClientSession, url: str, proc: subprocess.Popen[str], tries: int = 240
) -> None:
    """Poll `url` every 0.5 s until it answers 200 (bounded: `tries`; a model
    loads first, so the default allows about two minutes); fails the test when
    `proc` exits meanwhile."""
    for _ in range(tries):
        assert proc.poll() is None, f"{proc.args!r} exited with {proc.returncode}"
        try:
            async with http.get(url) as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.5)
    pytest.fail(f"{url} did not answer 200")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 60) -> int:
    """SIGTERM, then SIGKILL if it does not exit within `timeout` s; the exit code."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
    return proc.wait(timeout=30)
