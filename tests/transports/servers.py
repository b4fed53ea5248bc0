"""Servers in a subprocess for the transport tests: a free loopback port, the
process started with the project on its path, and its JSON log lines."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@asynccontextmanager
async def server_process(script: str, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -c script port`, stderr kept (the logs); killed on the way out
    if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(port),
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def json_logs(proc: asyncio.subprocess.Process) -> list[dict[str, Any]]:
    """The log records an ended process wrote on stderr (one JSON object a line)."""
    assert proc.stderr is not None
    return [json.loads(line) for line in (await proc.stderr.read()).decode().splitlines()]
