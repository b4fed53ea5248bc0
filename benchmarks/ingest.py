"""Ingest benchmarks; prints one JSON object on stdout, progress on stderr.

    .venv/bin/python benchmarks/ingest.py

segmenter: Segmenter throughput in multiples of real time on one core
(audio seconds processed per wall second), over the recordings in
../shared/audio at their own rate/channels, fed in 20 ms chunks (what a
client sends) and all at once.

server latency: what the server adds between the VAD closing an utterance and
the engine receiving the turn, with 50 concurrent real-time loopback streams
against a real WebSocket server (client and server in this process). Measured
from the moment Session.feed_audio returned the speech.stopped to the moment
an instrumented ScriptedEngine's submit() ran; p50/p99 in ms (goal p99 < 5 ms).
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voice_agent.vad import Segmenter  # noqa: E402

AUDIO_DIR = (ROOT / "../shared/audio").resolve()
SEGMENTER_FILES = [
    "jfk.wav",
    "librispeech-1272-128104-0000.flac",
    "ldc93s1-8k-mono.wav",
    "ldc93s1-44k-stereo.wav",
    "music.wav",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _load(name: str) -> tuple[bytes, int, int]:
    data, rate = sf.read(str(AUDIO_DIR / name), dtype="int16", always_2d=True)
    return data.tobytes(), int(rate), int(data.shape[1])


def _segment_seconds(pcm: bytes, rate: int, channels: int, chunk: int) -> float:
    seg = Segmenter(sample_rate=rate, channels=channels)
    start = time.perf_counter()
    for i in range(0, len(pcm), chunk):
        seg.feed(pcm[i : i + chunk])
    seg.flush()
    return time.perf_counter() - start


def bench_segmenter(repeats: int = 3) -> dict[str, Any]:
    """Best of `repeats` runs per file; totals over all files."""
    totals = {"20ms": [0.0, 0.0], "whole": [0.0, 0.0]}  # [audio s, wall s]
    per_file: dict[str, float] = {}
    for name in SEGMENTER_FILES:
        pcm, rate, channels = _load(name)
        audio_s = len(pcm) / (2 * channels * rate)
        for mode, chunk in (("20ms", 2 * channels * rate // 50), ("whole", len(pcm))):
            wall = min(_segment_seconds(pcm, rate, channels, chunk) for _ in range(repeats))
            totals[mode][0] += audio_s
            totals[mode][1] += wall
            if mode == "20ms":
                per_file[name] = round(audio_s / wall)
            log(f"segmenter {name} ({rate} Hz x{channels}, {mode}): {audio_s / wall:.0f}x")
    return {
        "segmenter_x_realtime": round(totals["20ms"][0] / totals["20ms"][1]),
        "segmenter_x_realtime_whole_file": round(totals["whole"][0] / totals["whole"][1]),
        "segmenter_x_realtime_per_file_20ms": per_file,
        "segmenter_audio_seconds": round(totals["20ms"][0], 1),
    }


def bench_server_latency(streams: int = 50, rounds: int = 2) -> dict[str, Any]:
    """p50/p99 of VAD close -> engine submit, `streams` concurrent real-time streams."""
    return asyncio.run(_server_latency(streams, rounds))


async def _server_latency(streams: int, rounds: int) -> dict[str, Any]:
    import numpy as np

    from voice_agent.audio import decode
    from voice_agent.client import RealtimeClient, pcm16_mono, send_paced
    from voice_agent.config import Config
    from voice_agent.engine.base import Conversation, TurnHandle, TurnInput
    from voice_agent.engine.scripted import ScriptedEngine
    from voice_agent.protocol import ReplyDone, SpeechStoppedEvent
    from voice_agent.session import Action, Send
    from voice_agent.transports.websocket import running_server

    submitted: dict[str, list[float]] = {}
    stopped: dict[str, list[float]] = {}

    class RecordingEngine(ScriptedEngine):
        def submit(
            self, conversation: Conversation, turn: TurnInput, max_new_tokens: int | None = None
        ) -> TurnHandle:
            now = time.perf_counter()
            submitted.setdefault(conversation.conversation_id, []).append(now)
            return super().submit(conversation, turn, max_new_tokens)

    clip = decode(AUDIO_DIR / "ldc93s1-16k-mono.wav")
    gap = np.zeros(16000, dtype=np.float32)
    audio = pcm16_mono(np.concatenate([gap, *([clip, gap, gap] * rounds)]))
    config = Config(port=0, max_sessions=streams + 10, ping_interval=0)
    engine = RecordingEngine(["ok."], token_delay=0.001)

    async with running_server(config, engine) as server:

        async def one(i: int) -> None:
            await asyncio.sleep(random.Random(i).uniform(0.0, 1.0))  # staggered starts
            async with RealtimeClient(server.url) as client:
                sid = (await client.start()).session_id
                session = server.sessions[sid].session
                feed = session.feed_audio

                def timed_feed(pcm: bytes) -> list[Action]:
                    actions = feed(pcm)
                    if any(
                        isinstance(a, Send) and isinstance(a.event, SpeechStoppedEvent)
                        for a in actions
                    ):
                        stopped.setdefault(sid, []).append(time.perf_counter())
                    return actions

                setattr(session, "feed_audio", timed_feed)  # noqa: B010 - instrument one instance
                await send_paced(client, audio, speed=1.0)
                async with asyncio.timeout(30):
                    while len(client.of_type(ReplyDone)) < rounds:
                        await client.wait_for(ReplyDone)

        log(f"server latency: {streams} real-time streams of {audio.duration_s:.1f} s")
        began = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(streams)))
        wall = time.perf_counter() - began

    latencies = []
    for sid, stops in stopped.items():
        subs = submitted.get(sid, [])
        latencies += [(b - a) * 1000.0 for a, b in zip(stops, subs, strict=False)]
    lat = np.array(sorted(latencies))
    log(f"server latency: {len(lat)} utterances in {wall:.1f} s")
    return {
        "server_latency_streams": streams,
        "server_latency_utterances": len(lat),
        "server_latency_p50_ms": round(float(np.percentile(lat, 50)), 3),
        "server_latency_p99_ms": round(float(np.percentile(lat, 99)), 3),
        "server_latency_max_ms": round(float(lat.max()), 3),
    }


def main() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    result: dict[str, Any] = {}
    result.update(bench_segmenter())
    result.update(bench_server_latency())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
