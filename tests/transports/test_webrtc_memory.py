"""WebRTC connect/disconnect cycles leave a server subprocess's memory and
file descriptors flat."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers.ports import free_port
from tests.helpers.waiting import until
from voice_agent.client import RealtimeClient
from voice_agent.protocol import (
    SpeechStartedEvent,
)

from .webrtc_support import (
    RATE,
    ROOT,
    PcmTrack,
    client_dtls_state,
    make_offer,
    negotiate,
    speech,
)

pytestmark = pytest.mark.timeout(120)


# ---------------------------------------------------------------- memory

SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from voice_agent.config import Config
    from voice_agent.engine.scripted import ScriptedEngine
    from voice_agent.logs import setup_logging
    from voice_agent.server import run

    setup_logging("info", "json")
    config = Config(host="127.0.0.1", port=int(sys.argv[1]))
    run(config, ScriptedEngine(["heard"], token_delay=0.001))
    """
)
WARMUP_CYCLES = 5
CYCLES = 50
MAX_GROWTH_MB = 20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def webrtc_cycle(url: str, pcm: np.ndarray[Any, Any]) -> None:
    """session.start, offer/answer, speech until speech.started, close the
    WebSocket, then wait for the server to close its side of the peer."""
    client = RealtimeClient(url)
    await client.connect()
    pc = await make_offer(PcmTrack(pcm, speed=4.0))
    try:
        await client.start()
        await negotiate(client, pc)
        await client.wait_for(SpeechStartedEvent, 30)
        await client.close()
        # The server closes its peer connection when the socket ends: its DTLS
        # close reaches the client (without it the client would stay connected).
        await until(lambda: client_dtls_state(pc) == "closed")
    finally:
        await client.close()
        await pc.close()


async def wait_for_server(port: int, proc: subprocess.Popen[bytes]) -> str:
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            async with RealtimeClient(url, open_timeout=2):
                return url
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_connect_disconnect_cycles_leave_server_memory_flat(
    audio_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    pcm = speech(audio_dir, RATE)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        url = await wait_for_server(port, proc)
        for _ in range(WARMUP_CYCLES):
            await webrtc_cycle(url, pcm)
        rss_before, fds_before = rss_mb(proc.pid), open_fds(proc.pid)
        for _ in range(CYCLES):
            await webrtc_cycle(url, pcm)
        await asyncio.sleep(0.5)  # the last teardown's stragglers
        rss_after, fds_after = rss_mb(proc.pid), open_fds(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    growth = rss_after - rss_before
    print(f"server RSS {rss_before:.1f} -> {rss_after:.1f} MB over {CYCLES} cycles")
    assert growth < MAX_GROWTH_MB, f"RSS grew {growth:.1f} MB over {CYCLES} cycles"
    assert fds_after <= fds_before + 2  # no UDP socket left behind
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    closed = [r for r in records if r["msg"] == "webrtc closed"]
    assert len(closed) == WARMUP_CYCLES + CYCLES
    assert all(r["frames_received"] > 0 for r in closed)
    assert not [r for r in records if r["level"] in ("error", "critical")]
