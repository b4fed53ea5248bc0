"""Servers in a subprocess: the process started with the project on its path,
and its JSON log lines. (Ports: tests.helpers.ports.)"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .paths import ROOT


def project_env(**extra: str) -> dict[str, str]:
    """os.environ with the checkout on PYTHONPATH (for `python -c ...` children)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


@asynccontextmanager
async def server_process(script: str, port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """`python -c script port`, stderr kept (the logs); killed on the way out
    if it is still running."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        script,
        str(port),
        env=project_env(),
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
