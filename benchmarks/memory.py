"""Memory of `voice-agent serve` with and without spoken replies.

    .venv/bin/python benchmarks/memory.py [--replies 3] [--clients 4] [--non-readers 4]
        [--model DIR] [--lead-ms MS] [--env NAME=VALUE] [--modes speech,text]

Loopback only; bounded (every wait has a timeout); stops by itself. For each
mode (`speech`: the default TTS, `text`: `--tts none`) it starts `serve` as a
subprocess (the tiny random model unless --model, `--db none`,
`--idle-timeout 0`, otherwise the default settings; `--env` adds environment variables such as
MALLOC_ARENA_MAX=2 for the breakdown) and reports its RSS (MiB, from /proc):

- `start`: once /readyz is 200;
- `one_client`: after one client had `--replies` text turns answered (and
  their audio played to the end: the client reads everything);
- `four_clients`: after `--clients` clients did the same at once;
- `non_reader_<i>`: after each of `--non-readers` clients in a row that start
  a session, send a text turn and then never read the socket (a raw TCP
  client with a small receive buffer), kept for `--non-reader-seconds` or
  until the server closes them;
- `settled`: 5 s after the last one went.

`--trace` also starts tracemalloc in the server after `start` and adds the
Python objects allocated since then and still alive at the end (their total
and top allocation sites): what Python holds, beside what native libraries
hold (tracemalloc's own bookkeeping then counts in the RSS). One JSON object
on stdout, progress on stderr.
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
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from websockets.client import ClientProtocol  # noqa: E402
from websockets.uri import parse_uri  # noqa: E402

from benchmarks.traced_server import TRACED_SERVER as SERVER  # noqa: E402
from voice_agent.client import RealtimeClient  # noqa: E402
from voice_agent.protocol import ReplyAudioDone, ReplyDone  # noqa: E402

PROMPT = "Tell me about the weather today, please."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def memory(pid: int) -> dict[str, float]:
    """RSS and anonymous memory (MiB) and threads of a process, from /proc."""
    out: dict[str, float] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "RssAnon:")):
                key = "rss_mib" if line.startswith("VmRSS") else "anon_mib"
                out[key] = round(int(line.split()[1]) / 1024, 1)
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
    return out


async def reading_client(url: str, replies: int, speak: bool) -> int:
    """A client that reads everything: `replies` text turns, each answered and
    (speaking) its audio to the end. Returns the audio bytes received."""
    async with RealtimeClient(url, on_audio=lambda _: None) as client:
        await client.start(16000, speak=speak)
        for _ in range(replies):
            await client.send_text(PROMPT)
            await client.wait_for(ReplyDone, 600)
            if speak:
                await client.wait_for(ReplyAudioDone, 600)
        return client.audio_bytes


def _frames(proto: ClientProtocol) -> bytes:
    return b"".join(proto.data_to_send())


async def non_reader(host: str, port: int, speak: bool, seconds: float) -> str:
    """Start a session, send a text turn, never read. How it ended."""
    proto = ClientProtocol(parse_uri(f"ws://{host}:{port}/v1/realtime"))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, (host, port))
    try:
        await loop.sock_sendall(sock, _frames_of(proto, proto.connect()))
        # the handshake answer: read it alone (then never read again)
        data = b""
        while b"\r\n\r\n" not in data:
            data += await loop.sock_recv(sock, 1)
        proto.receive_data(data)
        if proto.handshake_exc is not None:
            raise proto.handshake_exc
        start = {"type": "session.start", "sample_rate": 16000, "channels": 1, "speak": speak}
        proto.send_text(json.dumps(start).encode())
        proto.send_text(json.dumps({"type": "text", "text": PROMPT}).encode())
        await loop.sock_sendall(sock, _frames(proto))
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            # closed by the server: our send fails (or the peer reset)
            try:
                sock.send(b"")
            except OSError:
                return "closed by the server"
        return "kept"
    finally:
        sock.close()


def _frames_of(proto: ClientProtocol, request: Any) -> bytes:
    proto.send_request(request)
    return _frames(proto)


async def ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        await asyncio.sleep(0.5)
    raise SystemExit("the server did not become ready")


async def run_mode(args: argparse.Namespace, mode: str, model: str) -> dict[str, Any]:
    speak = mode == "speech"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = Path(tempfile.mkdtemp(prefix="voice-agent-memory-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update(dict(item.split("=", 1) for item in args.env))
    trace = tmp / "trace.txt"
    if args.trace:
        env["VOICE_AGENT_BENCH_TRACE"] = str(trace)
    argv = ["serve", "--model", model, "--host", "127.0.0.1", "--port", str(port)]
    # --idle-timeout 0: under load a long spoken reply outlasted the 300 s idle
    # timeout, which closed the session mid-audio (found here, fixed since)
    argv += ["--db", "none", "--log-level", "warning", "--idle-timeout", "0"]
    argv += ["--tts", "auto" if speak else "none"]
    if args.lead_ms is not None:
        argv += ["--tts-lead-ms", str(args.lead_ms)]
    proc = subprocess.Popen([sys.executable, "-c", SERVER, *argv], env=env, cwd=str(tmp))
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    points: dict[str, Any] = {}

    def point(name: str, **extra: Any) -> None:
        points[name] = {**memory(proc.pid), **extra}
        log(f"  {mode} {name}: {json.dumps(points[name])}")

    try:
        await ready(port, proc)
        await asyncio.sleep(2)
        point("start")
        if args.trace:
            (tmp / "trace.txt.start").touch()  # Python objects made from here on
            await asyncio.sleep(1)
        t = time.monotonic()
        audio = await reading_client(url, args.replies, speak)
        point("one_client", seconds=round(time.monotonic() - t, 1), audio_bytes=audio)
        t = time.monotonic()
        got = await asyncio.gather(
            *(reading_client(url, args.replies, speak) for _ in range(args.clients))
        )
        point("four_clients", seconds=round(time.monotonic() - t, 1), audio_bytes=sum(got))
        for i in range(args.non_readers):
            how = await non_reader("127.0.0.1", port, speak, args.non_reader_seconds)
            await asyncio.sleep(1)
            point(f"non_reader_{i + 1}", ended=how)
        await asyncio.sleep(5)
        point("settled")
        if args.trace:
            (tmp / "trace.txt.go").touch()
            for _ in range(100):
                if trace.exists():
                    break
                await asyncio.sleep(0.2)
            lines = trace.read_text().splitlines() if trace.exists() else []
            points["python_objects"] = {
                "total_mib": round(int(lines[0].split()[1]) / 2**20, 1) if lines else None,
                "top": lines[1:16],
            }
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return points


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="model directory (default: the tiny model)")
    parser.add_argument("--replies", type=int, default=3, help="text turns per client")
    parser.add_argument("--clients", type=int, default=4, help="clients at once")
    parser.add_argument("--non-readers", type=int, default=4, help="clients that never read")
    parser.add_argument("--non-reader-seconds", type=float, default=60.0)
    parser.add_argument("--lead-ms", type=int, help="--tts-lead-ms (default: serve's)")
    parser.add_argument("--modes", default="speech,text", help="speech, text or both")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--trace", action="store_true", help="tracemalloc in the server")
    args = parser.parse_args()
    if not (1 <= args.replies <= 50 and 0 <= args.clients <= 16 and 0 <= args.non_readers <= 16):
        parser.error("replies 1..50, clients 0..16, non-readers 0..16")
    model = args.model
    if model is None:
        model = tempfile.mkdtemp(prefix="voice-agent-tiny-")
        subprocess.run(
            [sys.executable, "-m", "voice_agent.cli", "make-tiny-model", model],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    result: dict[str, Any] = {
        "benchmark": "memory",
        "model": "tiny" if args.model is None else args.model,
        "replies": args.replies,
        "clients": args.clients,
        "non_readers": args.non_readers,
        "non_reader_seconds": args.non_reader_seconds,
        "lead_ms": args.lead_ms,
        "env": args.env,
        "cpus": os.cpu_count(),
    }
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        log(f"{mode} ...")
        points = await run_mode(args, mode, model)
        base = points["start"]["rss_mib"]
        points["growth_mib"] = {
            k: round(v["rss_mib"] - base, 1)
            for k, v in points.items()
            if isinstance(v, dict) and "rss_mib" in v
        }
        result[mode] = points
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
