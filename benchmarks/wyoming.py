"""Wyoming latency benchmark; prints one JSON object on stdout, progress on stderr.

    .venv/bin/python benchmarks/wyoming.py [--engine tiny|scripted] [--requests 20]
        [--audio FILE] [--max-new-tokens 16]

A voice_agent server (voice_agent.server.running: one engine, one host, no
store) with `--wyoming` on a free loopback port, and one client, the
`wyoming` package's AsyncTcpClient, sending Home Assistant's exact event
sequences one request after the other, as one Assist pipeline does:

- speech to text (homeassistant/components/wyoming/stt.py): transcribe,
  audio-start (16 kHz, 16 bit, mono), the recording in 10 ms audio-chunks as
  fast as they go, audio-stop; timed from the audio-stop written to the
  transcript read (`stt_ms`);
- conversation (conversation.py): one transcript event with a new
  conversation_id in its context; timed from the transcript written to the
  handled read (`handle_ms`). Its text is fixed (the tiny model's
  transcripts are noise), so every turn costs the same.

p50, p99 (nearest rank), mean and max in ms, over `--requests` requests
after one warm-up request of each kind. Engine: the tiny random Qwen2-Audio
(written to a temporary directory, real from_pretrained path) by default;
`--engine scripted` measures the transport and the host alone. The tiny
model's transcripts are noise that runs to the transcription's own token cap
(not --max-new-tokens), so `stt_ms` there is a full-length transcript.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import socket
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# `python benchmarks/wyoming.py` puts benchmarks/ first on sys.path, where this
# file would shadow the `wyoming` package it uses
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import soundfile  # noqa: E402
import soxr  # noqa: E402
from wyoming.asr import Transcribe, Transcript  # noqa: E402
from wyoming.audio import AudioChunk, AudioStart, AudioStop  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.event import Event  # noqa: E402

from voice_agent.config import Config  # noqa: E402
from voice_agent.engine.base import Engine  # noqa: E402
from voice_agent.server import running  # noqa: E402

RATE = 16000  # what Home Assistant's Wyoming STT sends: 16 kHz, 2 bytes, mono
CHUNK = RATE * 2 * 10 // 1000  # 10 ms
READ_TIMEOUT = 300.0  # per event: bounded, generous for a loaded CPU
TEXT = "Turn off the kitchen light, please."


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def pcm16k(path: Path) -> bytes:
    """The recording as 16 kHz mono PCM16 (what Home Assistant sends)."""
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    audio = soxr.resample(mono, rate, RATE) if rate != RATE else mono
    pcm: bytes = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return pcm


async def read_until(client: AsyncTcpClient, kind: str) -> Event:
    """Events up to `kind` (others skipped, as Home Assistant does); an error
    event or the connection's end raise."""
    for _ in range(100_000):
        event = await asyncio.wait_for(client.read_event(), READ_TIMEOUT)
        if event is None:
            raise RuntimeError(f"connection closed before {kind}")
        if event.type == kind:
            return event
        if event.type in ("error", "not-handled"):
            raise RuntimeError(f"{event.type}: {event.data}")
    raise RuntimeError(f"no {kind} within 100000 events")


async def stt(port: int, pcm: bytes) -> tuple[float, str]:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=RATE, width=2, channels=1).event())
        for i in range(0, len(pcm), CHUNK):
            chunk = AudioChunk(rate=RATE, width=2, channels=1, audio=pcm[i : i + CHUNK])
            await client.write_event(chunk.event())
        await client.write_event(AudioStop().event())  # drained: it has left
        start = time.perf_counter()
        event = await read_until(client, "transcript")
        ms = (time.perf_counter() - start) * 1000.0
    return ms, Transcript.from_event(event).text


async def handle(port: int, text: str) -> tuple[float, str]:
    async with AsyncTcpClient("127.0.0.1", port) as client:
        context = {"conversation_id": uuid.uuid4().hex}
        start = time.perf_counter()
        await client.write_event(Transcript(text, context=context, language="en").event())
        event = await read_until(client, "handled")
        ms = (time.perf_counter() - start) * 1000.0
    return ms, str(event.data.get("text") or "")


async def bench(args: argparse.Namespace, engine: Engine) -> dict[str, Any]:
    pcm = pcm16k(Path(args.audio))
    port = free_port()
    config = Config(
        host="127.0.0.1",
        port=0,
        db="none",
        max_new_tokens=args.max_new_tokens,
        wyoming=f"tcp://127.0.0.1:{port}",
    )
    stt_ms: list[float] = []
    handle_ms: list[float] = []
    transcript_chars: list[int] = []
    reply_chars: list[int] = []
    async with running(config, engine, close_engine=False):
        log(f"wyoming on tcp://127.0.0.1:{port}; warm-up")
        await stt(port, pcm)
        await handle(port, TEXT)
        t0 = time.perf_counter()
        for i in range(args.requests):
            ms, transcript = await stt(port, pcm)
            stt_ms.append(ms)
            transcript_chars.append(len(transcript))
            ms, reply = await handle(port, TEXT)
            handle_ms.append(ms)
            reply_chars.append(len(reply))
            if (i + 1) % 5 == 0:
                log(f"{i + 1}/{args.requests} requests")
        wall = time.perf_counter() - t0
    return {
        "benchmark": "wyoming",
        "engine": args.engine,
        "model": "tiny random Qwen2-Audio"
        if args.engine == "tiny" and not args.model
        else engine.model_name,
        "requests": args.requests,
        "audio": Path(args.audio).name,
        "audio_s": round(len(pcm) / 2 / RATE, 2),
        "max_new_tokens": args.max_new_tokens,
        "stt_ms": summary(stt_ms),  # audio-stop written -> transcript read
        "handle_ms": summary(handle_ms),  # transcript written -> handled read
        "transcript_chars_mean": round(sum(transcript_chars) / len(transcript_chars), 1),
        "reply_chars_mean": round(sum(reply_chars) / len(reply_chars), 1),
        "wall_s": round(wall, 2),
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
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument(
        "--audio",
        default=str(ROOT.parent / "shared" / "audio" / "ldc93s1-16k-mono.wav"),
        help="the recording sent for speech to text (any rate and channels)",
    )
    args = ap.parse_args()
    if not 1 <= args.requests <= 10_000:
        ap.error("--requests must be from 1 to 10000")

    with tempfile.TemporaryDirectory() as tmp:
        engine: Engine
        if args.engine == "scripted":
            from voice_agent.engine.scripted import ScriptedEngine

            engine = ScriptedEngine(["Sure, the kitchen light is off now."], token_delay=0.002)
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
        try:
            result = await bench(args, engine)
        finally:
            await engine.close()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
