"""One Wyoming audio stream in (pure): audio-start's format, the chunks, the
clip at 16 kHz mono for the model at audio-stop.

Any width Wyoming sends (1: unsigned 8-bit, 2: signed 16-bit, 3: signed
24-bit, 4: signed 32-bit, little-endian), 1 to MAX_CHANNELS interleaved
channels (averaged) and a rate of audio.MIN_RATE..audio.MAX_RATE Hz are
accepted; anything else is errors.BadAudio. A chunk must have the stream's
format and hold whole frames. The stream is bounded: more than `max_ms` of
audio is BadAudio (the model hears at most 30 s a clip).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from voice_agent.audio import MAX_RATE, MIN_RATE, resample
from voice_agent.engine.types import SAMPLE_RATE, AudioArray
from voice_agent.errors import BadAudio

WIDTHS = (1, 2, 3, 4)
MAX_CHANNELS = 8
MAX_MS = 30_000


@dataclass(frozen=True)
class AudioFormat:
    rate: int
    width: int
    channels: int

    @property
    def frame_bytes(self) -> int:
        return self.width * self.channels


def audio_format(rate: object, width: object, channels: object) -> AudioFormat:
    """The format of an audio-start or audio-chunk; BadAudio when unsupported."""
    for name, value in (("rate", rate), ("width", width), ("channels", channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadAudio(f"audio {name} must be an integer")
    assert isinstance(rate, int) and isinstance(width, int) and isinstance(channels, int)
    if not MIN_RATE <= rate <= MAX_RATE:
        raise BadAudio(f"unsupported sample rate {rate} Hz (use {MIN_RATE} to {MAX_RATE})")
    if width not in WIDTHS:
        raise BadAudio(f"unsupported sample width {width} (use 1, 2, 3 or 4 bytes)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise BadAudio(f"unsupported channel count {channels} (use 1 to {MAX_CHANNELS})")
    return AudioFormat(rate, width, channels)


def to_float(pcm: bytes, fmt: AudioFormat) -> AudioArray:
    """Interleaved PCM of `fmt` -> mono float32 in [-1, 1] at fmt.rate."""
    if len(pcm) % fmt.frame_bytes:
        raise BadAudio(f"audio of {len(pcm)} bytes is not whole frames of {fmt.frame_bytes} bytes")
    raw = np.frombuffer(pcm, dtype=np.uint8)
    if fmt.width == 1:
        samples = (raw.astype(np.float32) - 128.0) / 128.0
    elif fmt.width == 2:
        samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0
    elif fmt.width == 3:
        b = raw.reshape(-1, 3).astype(np.int32)
        value = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        value = np.where(value >= 1 << 23, value - (1 << 24), value)
        samples = value.astype(np.float32) / float(1 << 23)
    else:
        samples = (np.frombuffer(pcm, dtype="<i4").astype(np.float64) / float(1 << 31)).astype(
            np.float32
        )
    if fmt.channels > 1:
        samples = samples.reshape(-1, fmt.channels).mean(axis=1, dtype=np.float32)
    return np.asarray(samples, dtype=np.float32)


class AudioIn:
    """The chunks of one audio stream (audio-start .. audio-stop)."""

    def __init__(self, fmt: AudioFormat, max_ms: int = MAX_MS) -> None:
        self.format = fmt
        self.max_bytes = fmt.rate * fmt.frame_bytes * max_ms // 1000
        self.max_ms = max_ms
        self._pcm = bytearray()

    @property
    def size(self) -> int:
        """Bytes received so far."""
        return len(self._pcm)

    @property
    def ms(self) -> int:
        return len(self._pcm) // self.format.frame_bytes * 1000 // self.format.rate

    def add(self, pcm: bytes, fmt: AudioFormat | None = None) -> None:
        """One chunk (its own format, when the chunk says it, must be the
        stream's); BadAudio on a partial frame, another format or too much audio."""
        if fmt is not None and fmt != self.format:
            raise BadAudio("audio-chunk format differs from audio-start's")
        if len(pcm) % self.format.frame_bytes:
            raise BadAudio(
                f"audio-chunk of {len(pcm)} bytes is not whole frames "
                f"of {self.format.frame_bytes} bytes"
            )
        if len(self._pcm) + len(pcm) > self.max_bytes:
            raise BadAudio(f"audio longer than {self.max_ms // 1000} s")
        self._pcm += pcm

    def finish(self) -> AudioArray:
        """The whole stream as 16 kHz mono float32."""
        mono = to_float(bytes(self._pcm), self.format)
        return resample(mono, self.format.rate, SAMPLE_RATE)
