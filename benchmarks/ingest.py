"""Ingest benchmarks; prints one JSON object on stdout, progress on stderr.

    .venv/bin/python benchmarks/ingest.py

segmenter: Segmenter throughput in multiples of real time on one core
(audio seconds processed per wall second), over the recordings in
../shared/audio at their own rate/channels, fed in 20 ms chunks (what a
client sends) and all at once.
"""

from __future__ import annotations

import json
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


def main() -> None:
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    result: dict[str, Any] = {}
    result.update(bench_segmenter())
    print(json.dumps(result))


if __name__ == "__main__":
    main()
