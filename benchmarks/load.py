"""Load benchmark: N concurrent real-time speech streams against a real server.

    .venv/bin/python benchmarks/load.py [--steps 25,50,100,150,200,250] [--seconds 8]

Loopback only; bounded in count and time; stops by itself. The server runs in
a subprocess (`voice_agent.server.run`, a ScriptedEngine that answers every
turn with a short reply, limits raised so that one address may open every
connection, the event loop that `serve` uses: uvloop when installed); this
process runs the clients. For each N (ramping up), N clients connect (10
every 50 ms) and start sessions; then each streams real speech from
../shared/audio (16 kHz files, looped, each client starting at another
offset) in 20 ms frames at real-time pace for `--seconds`, at its own phase
within the 20 ms (one scheduler task sends every client's frames), and reads
the events (replies come back as speech ends).

Per step it reports, from the server (its SIGUSR1 handler writes the figures
since the last step, with timestamps, to a file), while streaming (from
0.5 s after the last session started to the last frame sent):
- frame_ms p50/p99/max: time the server spends on one binary frame, from the
  message leaving the WebSocket reader to the Session having consumed it (VAD,
  and any events it sends; on the fast path, from the protocol handing the
  frame over to the Session having consumed it, the frame's actions queued);
- loop_lag_ms p50/p99/max: how late a 10 ms timer fires on the server's event
  loop (time frames wait before the reader gets to them);
and the same over the whole step, connection ramp and closes included
(`whole_step_*`); frames_received vs frames_sent: dropped = sent - received
(counted after the step's connections closed); from the clients: errors
(error events and unexpected closes), late_frames (frames the load generator
itself could not send within 20 ms of schedule: it shares the machine with
the server), replies; and the server's RSS and CPU use while streaming
(percent of one core), from /proc.

`max_ok_n` is the largest N with no errors, no dropped frames and frame and
loop-lag p99 under 20 ms; the run stops at the first step that fails.
One JSON object on stdout, progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voice_agent.client import RealtimeClient  # noqa: E402
from voice_agent.protocol import ErrorEvent, ReplyDone  # noqa: E402

AUDIO_DIR = (ROOT / "../shared/audio").resolve()
SPEECH = [
    "jfk.wav",
    "librispeech-1272-128104-0000.flac",
    "ldc93s1-16k-mono.wav",
    "new-home-in-the-stars-16k.wav",
]
FRAME_BYTES = 640  # 20 ms at 16 kHz mono PCM16
FRAME_S = 0.02
GOAL_MS = 20.0

SERVER = textwrap.dedent(
    """
    import asyncio, dataclasses, json, os, signal, sys, time
    from voice_agent.config import Config
    from voice_agent.engine.scripted import ScriptedEngine
    from voice_agent.logs import setup_logging
    from voice_agent.server import loop_factory, serve_until_signal
    from voice_agent.transports.websocket import connection as websocket  # _Connection

    port, stats_path = int(sys.argv[1]), sys.argv[2]
    # per frame: (start, seconds) on perf_counter (cheap: the probe's own
    # cost counts in the server's CPU), moved to the monotonic clock on dump
    frames, lags = [], []
    shift = time.monotonic() - time.perf_counter()
    original = websocket._Connection._on_message
    clock = time.perf_counter

    async def timed(self, message):
        if message.__class__ is not bytes:
            return await original(self, message)
        start = clock()
        try:
            return await original(self, message)
        finally:
            frames.append((start, clock() - start))

    websocket._Connection._on_message = timed
    original_now = websocket._Connection._audio_now

    def timed_now(self, pcm):  # the fast path (frames fed inside the protocol)
        start = clock()
        handled = original_now(self, pcm)
        if handled:
            frames.append((start, clock() - start))
        return handled

    websocket._Connection._audio_now = timed_now

    def dump(*_):
        global frames, lags
        out = [(at + shift, seconds) for at, seconds in frames]
        with open(stats_path + ".tmp", "w") as f:
            json.dump({"frames": out, "lags": lags}, f)
        os.replace(stats_path + ".tmp", stats_path)
        frames, lags = [], []

    async def main():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, dump)

        async def lag():
            while True:
                t = time.monotonic()  # comparable with the load generator's clock
                await asyncio.sleep(0.01)
                lags.append((t, time.monotonic() - t - 0.01))

        task = asyncio.create_task(lag())
        config = dataclasses.replace(
            Config.from_sources(),  # VOICE_AGENT_* from --set
            port=port, db="none", max_sessions=2000, max_connections_per_client=2000,
            max_queue=4096, log_level="warning",
        )
        engine = ScriptedEngine(["Okay."], token_delay=0.005, max_queue=4096)
        await serve_until_signal(config, engine)
        task.cancel()

    setup_logging("warning", "text")
    factory = loop_factory(Config.from_sources().event_loop)
    print("event loop:", "uvloop" if factory else "asyncio", file=sys.stderr, flush=True)
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
    """
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def load_speech() -> bytes:
    pcm = b""
    for name in SPEECH:
        data, rate = sf.read(str(AUDIO_DIR / name), dtype="int16", always_2d=True)
        if rate != 16000 or data.shape[1] != 1:
            raise SystemExit(f"{name}: expected 16 kHz mono")
        pcm += data.tobytes() + bytes(16000)  # 0.5 s of silence between files
    return pcm[: len(pcm) - len(pcm) % FRAME_BYTES]


def proc_stats(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of a process, from /proc."""
    rss = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


class Totals:
    def __init__(self) -> None:
        self.sent = 0
        self.late = 0
        self.errors = 0
        self.replies = 0
        self.connect_failures = 0


async def connect(url: str, t: Totals) -> RealtimeClient | None:
    """One client, connected and with its session started (None on failure)."""
    c = RealtimeClient(url, open_timeout=30)
    try:
        await c.connect()
        await c.start(timeout=30)
    except Exception:
        t.connect_failures += 1
        t.errors += 1
        await c.close()
        return None
    return c


async def stream(
    clients: list[RealtimeClient], pcm: bytes, offsets: list[int], seconds: float, t: Totals
) -> tuple[float, float]:
    """Every client sends one 20 ms frame every 20 ms, at its own phase.

    Client i's frames are due at t0 + k * 20 ms + phase_i, the phases spread
    evenly over the 20 ms (independent devices do not send in lockstep). One
    scheduler task sends them, 1 ms slot by slot: a task per client sleeping
    per frame cost the load generator more CPU than the server spent. A frame
    sent more than 20 ms after it was due counts as late (a limit of the load
    generator, which shares the machine with the server). Returns the
    streaming window (monotonic start, end).
    """
    slots = 20
    by_slot: list[list[int]] = [[] for _ in range(slots)]
    for i in range(len(clients)):
        by_slot[i * slots // max(1, len(clients))].append(i)
    pos = list(offsets)
    alive = [True] * len(clients)
    start = time.monotonic() + 0.05
    t0 = time.perf_counter() + 0.05
    for k in range(int(seconds / FRAME_S)):
        for slot, members in enumerate(by_slot):
            if not members:
                continue
            due = t0 + k * FRAME_S + slot * FRAME_S / slots
            now = time.perf_counter()
            if now < due:
                await asyncio.sleep(due - now)
            elif now - due > FRAME_S:
                t.late += len(members)
            for i in members:
                if not alive[i]:
                    continue
                p = pos[i] if pos[i] + FRAME_BYTES <= len(pcm) else 0
                try:
                    await clients[i].send_audio(pcm[p : p + FRAME_BYTES])
                except Exception:
                    alive[i] = False
                    t.errors += 1
                    continue
                pos[i] = p + FRAME_BYTES
                t.sent += 1
    return start, time.monotonic()


async def finish(c: RealtimeClient, t: Totals) -> None:
    t.errors += len(c.of_type(ErrorEvent))
    t.replies += len(c.of_type(ReplyDone))
    if c.close_code is not None:
        t.errors += 1
    await c.close()


async def _read_stats(path: Path) -> dict[str, Any]:
    """The figures the server dumped on SIGUSR1 (then the file is removed)."""
    for _ in range(200):
        await asyncio.sleep(0.05)
        try:
            stats: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        path.unlink()
        return stats
    raise RuntimeError("the server did not write its figures")


def _window(samples: list[list[float]], lo: float, hi: float) -> list[float]:
    """Values (ms) of (time, seconds) samples taken between lo and hi."""
    return [v * 1000 for at, v in samples if lo <= at <= hi]


async def step(
    url: str, pid: int, stats_path: Path, pcm: bytes, n: int, seconds: float
) -> dict[str, Any]:
    totals = Totals()
    os.kill(pid, signal.SIGUSR1)  # reset the server's figures
    await _read_stats(stats_path)
    stride = max(FRAME_BYTES, (len(pcm) // max(1, n)) // FRAME_BYTES * FRAME_BYTES)
    ramp_start = time.monotonic()
    pending = []
    for i in range(n):  # a gentle ramp: 10 connections every 50 ms
        pending.append(asyncio.create_task(connect(url, totals)))
        if i % 10 == 9:
            await asyncio.sleep(0.05)
    connected = await asyncio.wait_for(asyncio.gather(*pending), 120)
    clients = [c for c in connected if c is not None]
    offsets = [(i * stride) % len(pcm) for i in range(len(clients))]
    log(f"  {len(clients)} connected in {time.monotonic() - ramp_start:.1f} s; streaming")
    rss0, cpu0 = proc_stats(pid)
    lo, hi = await asyncio.wait_for(stream(clients, pcm, offsets, seconds, totals), seconds + 120)
    rss1, cpu1 = proc_stats(pid)
    await asyncio.sleep(1.0)  # the last replies
    await asyncio.gather(*(finish(c, totals) for c in clients))
    os.kill(pid, signal.SIGUSR1)
    server = await _read_stats(stats_path)
    frames_all = [v * 1000 for _, v in server["frames"]]
    lags_all = [v * 1000 for _, v in server["lags"]]
    # while streaming, after the first 0.5 s (the last handshakes settle)
    frames_ms = _window(server["frames"], lo + 0.5, hi)
    lags_ms = _window(server["lags"], lo + 0.5, hi)
    result = {
        "n": n,
        "seconds": seconds,
        "frames_sent": totals.sent,
        "frames_received": len(frames_all),
        "dropped_frames": max(0, totals.sent - len(frames_all)),
        "late_client_frames": totals.late,
        "errors": totals.errors,
        "replies": totals.replies,
        "frame_ms_p50": round(pct(frames_ms, 0.50), 3),
        "frame_ms_p99": round(pct(frames_ms, 0.99), 3),
        "frame_ms_max": round(max(frames_ms, default=0.0), 3),
        "loop_lag_ms_p50": round(pct(lags_ms, 0.50), 3),
        "loop_lag_ms_p99": round(pct(lags_ms, 0.99), 3),
        "loop_lag_ms_max": round(max(lags_ms, default=0.0), 3),
        # the whole step: the connection ramp and the closes too
        "whole_step_frame_ms_p99": round(pct(frames_all, 0.99), 3),
        "whole_step_loop_lag_ms_p99": round(pct(lags_all, 0.99), 3),
        "whole_step_loop_lag_ms_max": round(max(lags_all, default=0.0), 3),
        "server_rss_mib": round(rss1, 1),
        "server_rss_growth_mib": round(rss1 - rss0, 1),
        "server_cpu_percent": round(100 * (cpu1 - cpu0) / max(1e-9, hi - lo), 1),
        # the same CPU as work per frame sent (what was compared with old main)
        "server_cpu_s": round(cpu1 - cpu0, 3),
        "stream_s": round(hi - lo, 3),
        "server_cpu_ms_per_frame": round(1000 * (cpu1 - cpu0) / max(1, totals.sent), 4),
    }
    result["ok"] = (
        result["errors"] == 0
        and result["dropped_frames"] == 0
        and result["frame_ms_p99"] < GOAL_MS
        and result["loop_lag_ms_p99"] < GOAL_MS
    )
    return result


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", default="25,50,100,150,200,250", help="client counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="streaming time per step")
    parser.add_argument("--keep-going", action="store_true", help="do not stop at a failed step")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a server setting (Config field), e.g. turn_detection=silence; repeatable",
    )
    args = parser.parse_args()
    steps = [int(x) for x in args.steps.split(",") if x.strip()]
    if not steps or max(steps) > 2000 or not 1 <= args.seconds <= 120:
        parser.error("steps 1..2000, seconds 1..120")
    pcm = load_speech()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="voice-agent-load-"))
    stats_path = tmp / "stats.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    settings = dict(item.split("=", 1) for item in args.set)
    for name, value in settings.items():
        env["VOICE_AGENT_" + name.upper()] = value
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(port), str(stats_path)], env=env, cwd=str(tmp)
    )
    results: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.1)
        url = f"ws://127.0.0.1:{port}/v1/realtime"
        for n in steps:
            log(f"{n} clients for {args.seconds:g} s ...")
            result = await step(url, proc.pid, stats_path, pcm, n, args.seconds)
            log(f"  {json.dumps(result)}")
            results.append(result)
            if not result["ok"] and not args.keep_going:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    ok = [r["n"] for r in results if r["ok"]]
    first_bad = next((r["n"] for r in results if not r["ok"]), None)
    print(
        json.dumps(
            {
                "benchmark": "load",
                "engine": "scripted",
                "settings": settings,
                "event_loop": settings.get("event_loop", "auto (uvloop when installed)"),
                "cpus": os.cpu_count(),
                "goal": {"n": 200, "p99_ms": GOAL_MS, "errors": 0, "dropped_frames": 0},
                "max_ok_n": max((n for n in ok if first_bad is None or n < first_bad), default=0),
                "first_failed_n": first_bad,
                "steps": results,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
