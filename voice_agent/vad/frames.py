"""20 ms frames of 16 kHz PCM16 and their float conversion (pure)."""

from __future__ import annotations

import numpy as np

from voice_agent.audio import FRAME_MS
from voice_agent.engine.types import SAMPLE_RATE, AudioArray

FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 320
FRAME_BYTES = 2 * FRAME_SAMPLES  # 640


def to_float(pcm: bytes) -> AudioArray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def to_pcm16(a: AudioArray) -> bytes:
    scaled = np.clip(np.round(a * np.float32(32768.0)), -32768, 32767)
    return scaled.astype("<i2").tobytes()
