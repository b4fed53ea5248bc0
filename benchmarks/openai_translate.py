"""What the OpenAI Realtime translation itself costs on the voice-to-voice path.

    .venv/bin/python benchmarks/openai_translate.py [--turns 2000]

benchmarks/voice.py measures the whole path end to end (the same server,
native WebSocket beside the OpenAI protocol) but over a handful of turns on
a shared machine, where scheduling noise is tens of milliseconds. This one
measures only the work the OpenAI path adds, in process, with no network, by
driving the pure translator (voice_agent/transports/openai_realtime/) as the
connection does, including the JSON encoding of every event:

- append: one client `input_audio_buffer.append` of 20 ms of 24 kHz PCM16
  (JSON parse, base64 decode, the Feed call), per frame;
- to_first_audio: what lies between the end of the user's speech and the
  first audio byte on the wire: `speech.stopped` (speech_stopped, committed,
  item added/done), `reply.started` (response.created, output item and
  content part added), and the first 20 ms of reply audio
  (response.output_audio.delta with base64), every event JSON-encoded.

Prints one JSON object (p50/p99/max in microseconds); progress on stderr.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voice_agent.protocol import (  # noqa: E402
    ReplyDone,
    ReplyStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)
from voice_agent.session import SessionConfig  # noqa: E402
from voice_agent.transports.openai_realtime.translator import Translator  # noqa: E402

RATE = 24_000
FRAME = RATE // 50  # 20 ms


def _dumps(out: list[Any]) -> int:
    return sum(len(json.dumps(o, separators=(",", ":"))) for o in out if isinstance(o, dict))


def _stats(samples_s: list[float]) -> dict[str, float]:
    us = sorted(s * 1e6 for s in samples_s)
    return {
        "n": len(us),
        "p50_us": round(statistics.median(us), 1),
        "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1),
        "max_us": round(us[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=2000)
    args = parser.parse_args()

    base = SessionConfig()
    t = Translator(lambda _p: base, model="qwen2-audio", tag="bench", can_speak=True)
    t.client(
        json.dumps(
            {
                "type": "session.update",
                "session": {"type": "realtime", "output_modalities": ["audio"]},
            }
        )
    )
    rng = np.random.default_rng(0)
    pcm = (rng.standard_normal(FRAME) * 3000).astype("<i2").tobytes()
    append = json.dumps(
        {"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode("ascii")}
    )
    appends: list[float] = []
    first_audio: list[float] = []
    for n in range(args.turns):
        if n % 500 == 0:
            print(f"turn {n}/{args.turns}", file=sys.stderr)
        for _ in range(10):  # some speech frames
            t0 = time.perf_counter()
            t.client(append)
            appends.append(time.perf_counter() - t0)
        utt, reply = f"u{n}", f"r{n}"
        t.server(SpeechStartedEvent(utt, n * 1000))
        t0 = time.perf_counter()
        size = _dumps(list(t.server(SpeechStoppedEvent(utt, n * 1000, n * 1000 + 800))))
        size += _dumps(list(t.server(ReplyStarted(reply, utt))))
        size += _dumps(t.audio(pcm, reply))
        first_audio.append(time.perf_counter() - t0)
        t.server(ReplyDone(reply, "ok", {}, {}))
        t.settled(reply)
    print(
        json.dumps(
            {
                "benchmark": "openai_translate",
                "turns": args.turns,
                "append_20ms_24k": _stats(appends),
                "to_first_audio": _stats(first_audio),
                "host": {
                    "python": platform.python_version(),
                    "cpus": os.cpu_count(),
                    "machine": platform.machine(),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
