"""MQTT latency benchmark; prints one JSON object on stdout, progress on stderr.

    .venv/bin/python benchmarks/mqtt.py [--engine tiny|scripted] [--requests 100]
        [--devices 10] [--broker mqtt://host:port] [--audio FILE]

A loopback mosquitto (started here on a free port unless --broker is given),
the agent's MqttTransport on a ConversationHost (no store) and one engine
(default: the tiny random Qwen2-Audio, written to a temporary directory;
`--engine scripted` isolates the transport and the host), and one test
client. Each of `--devices` devices sends its share of `--requests` requests
one after the other (the next when the previous reply arrived), all devices
at once. Measured at the client, from its publish on
PREFIX/DEVICE/ask to the first PREFIX/DEVICE/reply/delta of that id and to the
PREFIX/DEVICE/reply: p50, p99 (nearest rank), mean and max in ms. Text
requests by default; `--audio FILE` sends the file base64-encoded instead.
A warm-up request per device is not counted.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aiomqtt  # noqa: E402

from voice_agent.config import Config  # noqa: E402
from voice_agent.engine.base import Engine  # noqa: E402
from voice_agent.host import ConversationHost  # noqa: E402
from voice_agent.transports.mqtt import NO_DELAY, running_mqtt  # noqa: E402

PREFIX = "voice_agent"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mosquitto(directory: Path) -> Any:
    """A loopback mosquitto on a free port; yields its mqtt:// URL."""
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = directory / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "persistence false",
        "set_tcp_nodelay true",  # as docs/home-automation.md recommends
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if proc.poll() is not None:
                raise SystemExit(f"mosquitto exited with {proc.returncode}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 50), 1),
        "p99": round(percentile(values, 99), 1),
        "mean": round(sum(values) / len(values), 1),
        "max": round(max(values), 1),
    }


class Client:
    """Publishes requests and timestamps their first delta and their reply."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        # TCP_NODELAY as the agent sets it (paho leaves Nagle on)
        self.client = aiomqtt.Client(
            host, int(port), identifier="bench-client", socket_options=NO_DELAY
        )
        self.sent: dict[str, float] = {}
        self.first: dict[str, float] = {}
        self.done: dict[str, asyncio.Future[float]] = {}
        self.errors: list[Any] = []
        self.reply_chars: list[int] = []

    async def run(self) -> None:
        async for m in self.client.messages:
            now = time.perf_counter()
            body = json.loads(bytes(m.payload))  # type: ignore[arg-type]
            topic = str(m.topic)
            rid = body.get("id")
            if topic.endswith("/reply/delta"):
                self.first.setdefault(rid, now)
            elif topic.endswith("/reply"):
                self.reply_chars.append(len(body.get("text", "")))
                fut = self.done.get(rid)
                if fut is not None and not fut.done():
                    fut.set_result(now)
            elif topic.endswith("/error"):
                self.errors.append(body)
                fut = self.done.get(rid)
                if fut is not None and not fut.done():
                    fut.set_exception(RuntimeError(body.get("code")))

    async def request(self, device: str, rid: str, body: dict[str, Any]) -> tuple[float, float]:
        loop = asyncio.get_running_loop()
        self.done[rid] = loop.create_future()
        payload = json.dumps({"id": rid, **body})
        self.sent[rid] = time.perf_counter()
        await self.client.publish(f"{PREFIX}/{device}/ask", payload, qos=1)
        end = await asyncio.wait_for(self.done[rid], 600)
        start = self.sent[rid]
        first = self.first.get(rid, end)
        return (first - start) * 1000.0, (end - start) * 1000.0


async def bench(args: argparse.Namespace, url: str, engine: Engine) -> dict[str, Any]:
    body: dict[str, Any] = {"text": "hello, what can you do?"}
    if args.audio:
        body = {"audio": base64.b64encode(Path(args.audio).read_bytes()).decode()}
    config = Config(
        mqtt=url,
        mqtt_prefix=PREFIX,
        max_new_tokens=args.max_new_tokens,
        max_queue=max(64, args.devices * 2),
    )
    await engine.start()
    host = ConversationHost(config, engine)
    host.engine_started()
    async with running_mqtt(config, host) as transport:
        await transport.wait_connected(30)
        client = Client(url)
        async with client.client:
            await client.client.subscribe(
                [(f"{PREFIX}/+/reply", 1), (f"{PREFIX}/+/reply/delta", 0), (f"{PREFIX}/+/error", 1)]
            )
            reader = asyncio.create_task(client.run())
            devices = [f"bench-{i}" for i in range(args.devices)]
            log(f"warm-up: one request per device ({len(devices)} devices)")
            await asyncio.gather(*(client.request(d, f"warm-{d}", body) for d in devices))
            per_device = math.ceil(args.requests / args.devices)
            firsts: list[float] = []
            replies: list[float] = []
            done = 0

            async def device_loop(device: str, n: int) -> None:
                nonlocal done
                for i in range(n):
                    first, reply = await client.request(device, f"{device}-{i}", body)
                    firsts.append(first)
                    replies.append(reply)
                    done += 1
                    if done % 10 == 0:
                        log(f"{done}/{args.requests} requests")

            counts = [per_device] * args.devices
            counts[-1] -= per_device * args.devices - args.requests
            t0 = time.perf_counter()
            await asyncio.gather(*(device_loop(d, n) for d, n in zip(devices, counts, strict=True)))
            wall = time.perf_counter() - t0
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        stats = transport.stats
    await host.close()
    await engine.close()
    return {
        "benchmark": "mqtt",
        "engine": args.engine,
        "model": "tiny random Qwen2-Audio"
        if args.engine == "tiny" and not args.model
        else engine.model_name,
        "request": "audio" if args.audio else "text",
        "requests": len(replies),
        "devices": args.devices,
        "max_new_tokens": args.max_new_tokens,
        "first_delta_ms": summary(firsts),
        "reply_ms": summary(replies),
        "reply_chars_mean": round(sum(client.reply_chars) / len(client.reply_chars), 1),
        "requests_per_s": round(len(replies) / wall, 2),
        "wall_s": round(wall, 2),
        "errors": len(client.errors),
        "agent_stats": {
            "requests": stats.requests,
            "replies": stats.replies,
            "duplicates": stats.duplicates,
            "busy": stats.busy,
        },
        "host": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--engine", choices=["tiny", "scripted"], default="tiny")
    ap.add_argument("--model", help="model directory for --engine tiny (default: make one)")
    ap.add_argument("--device", default="cpu", help="torch device of the tiny engine")
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--devices", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--broker", help="mqtt://host:port of a running broker (default: start one)")
    ap.add_argument("--audio", help="send this audio file (base64) instead of text")
    args = ap.parse_args()
    if args.requests < 1 or args.devices < 1:
        ap.error("--requests and --devices must be at least 1")

    with tempfile.TemporaryDirectory() as tmp:
        engine: Engine
        if args.engine == "scripted":
            from voice_agent.engine.scripted import ScriptedEngine

            engine = ScriptedEngine(
                ["Sure, the kitchen light is off now and the heating is set."], token_delay=0.002
            )
        else:
            from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
            from voice_agent.engine.tiny import make_tiny_model

            model = args.model
            if not model:
                log("making the tiny model")
                model = str(make_tiny_model(Path(tmp) / "tiny"))
            e = Qwen2AudioEngine(
                model, device=args.device, max_new_tokens=args.max_new_tokens, temperature=0.0
            )
            log("loading the model")
            await asyncio.to_thread(e.load)
            engine = e
        if args.broker:
            result = await bench(args, args.broker, engine)
        else:
            with mosquitto(Path(tmp)) as url:
                log(f"mosquitto on {url}")
                result = await bench(args, url, engine)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
