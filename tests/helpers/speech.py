"""Shared checks for spoken audio."""

from __future__ import annotations

import numpy as np
import webrtcvad

from voice_agent.audio import float_to_pcm16, pcm16_to_float, resample


def voiced_fraction(pcm16: bytes, sample_rate: int) -> float:
    """The share of 30 ms frames webrtcvad (aggressiveness 3) calls speech, at 16 kHz."""
    audio = resample(pcm16_to_float(pcm16), sample_rate, 16000)
    pcm = float_to_pcm16(audio)
    vad = webrtcvad.Vad(3)
    step = 2 * 480
    frames = [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]
    if not frames:
        return 0.0
    return sum(bool(vad.is_speech(f, 16000)) for f in frames) / len(frames)


def as_pcm16(audio: np.ndarray) -> bytes:
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype("<i2").tobytes()
    return float_to_pcm16(audio.astype(np.float32))
