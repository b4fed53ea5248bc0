"""Audio helpers: decode files, resample, convert and frame PCM (pure, no I/O
besides reading the file a caller names).

Everything the model sees is 16 kHz mono float32 in [-1, 1] (`AudioArray`).
Resampling is done by soxr, in one shot (`resample`) or as a stream
(`StreamResampler`), never by hand. Every bad input raises errors.BadAudio with
a one-line message that is safe to show to a client.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from voice_agent.engine.types import SAMPLE_RATE, AudioArray
from voice_agent.errors import BadAudio

MIN_RATE = 8000
MAX_RATE = 48000
FRAME_MS = 20
_PCM_SCALE = 32768.0

AudioSource = str | os.PathLike[str] | bytes


@dataclass(frozen=True)
class AudioInfo:
    """What the source was before it became 16 kHz mono."""

    sample_rate: int
    channels: int
    duration_s: float
    format: str


def decode(source: AudioSource, max_seconds: float | None = None) -> AudioArray:
    """Decode WAV/FLAC/OGG/MP3 (a path or the file's bytes) to 16 kHz mono float32."""
    return decode_with_info(source, max_seconds)[0]


def decode_with_info(
    source: AudioSource, max_seconds: float | None = None
) -> tuple[AudioArray, AudioInfo]:
    """Like `decode`, also returning the source's rate, channels and duration.

    `max_seconds` refuses longer audio before decoding it (BadAudio).
    """
    if isinstance(source, bytes | bytearray):
        if not source:
            raise BadAudio("audio is empty")
        opener: object = io.BytesIO(source)
    else:
        path = _existing_file(source)
        opener = path
    try:
        with sf.SoundFile(opener) as f:
            rate, channels, fmt = int(f.samplerate), int(f.channels), str(f.format)
            if max_seconds is not None and f.frames > max_seconds * rate:
                raise BadAudio(f"audio is longer than {max_seconds:g} s")
            data = f.read(dtype="float32", always_2d=True)
    except sf.LibsndfileError as exc:
        raise BadAudio(f"cannot decode audio: {_clean_reason(exc)}") from None
    except (RuntimeError, ValueError, TypeError, EOFError) as exc:
        raise BadAudio(f"cannot decode audio: {_clean_reason(exc)}") from None
    if data.shape[0] == 0:
        raise BadAudio("audio is empty")
    mono = _downmix(np.asarray(data, dtype=np.float32))
    mono = np.clip(np.nan_to_num(mono, nan=0.0, posinf=1.0, neginf=-1.0), -1.0, 1.0)
    out = resample(mono, rate, SAMPLE_RATE)
    info = AudioInfo(rate, channels, data.shape[0] / rate, fmt)
    return out, info


def _clean_reason(exc: BaseException) -> str:
    """libsndfile's own reason ("Format not recognised"), without paths or codes."""
    text = getattr(exc, "error_string", None) or str(exc) or type(exc).__name__
    reason = str(text).strip().splitlines()[0].rstrip(".")
    if ": " in reason and "Error opening" in reason:
        reason = reason.rsplit(": ", 1)[-1]
    if "does not exist" in reason:  # libsndfile's words for some unparsable files
        reason = "format not recognised"
    return reason[:1].lower() + reason[1:] if reason else "unknown format"


def _downmix(data: np.ndarray) -> AudioArray:
    """(frames, channels) -> mono by averaging the channels."""
    if data.ndim == 1:
        return data.astype(np.float32, copy=False)
    if data.shape[1] == 1:
        return np.ascontiguousarray(data[:, 0], dtype=np.float32)
    mono: AudioArray = data.mean(axis=1, dtype=np.float32)
    return mono


def resample(a: AudioArray, from_rate: int, to_rate: int = SAMPLE_RATE) -> AudioArray:
    """Resample mono float32 audio with soxr (HQ); identity when rates match."""
    a = np.asarray(a, dtype=np.float32)
    if from_rate == to_rate or a.size == 0:
        return a
    out = soxr.resample(a, from_rate, to_rate)
    return np.clip(np.asarray(out, dtype=np.float32), -1.0, 1.0)


def validate_format(sample_rate: int, channels: int) -> None:
    """BadAudio unless 8000 <= sample_rate <= 48000 and channels is 1 or 2."""
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int):
        raise BadAudio("sample rate must be an integer")
    if not MIN_RATE <= sample_rate <= MAX_RATE:
        raise BadAudio(f"unsupported sample rate {sample_rate} Hz (use {MIN_RATE} to {MAX_RATE})")
    if isinstance(channels, bool) or channels not in (1, 2):
        raise BadAudio(f"unsupported channel count {channels} (use 1 or 2)")


def check_pcm16_length(pcm: bytes, channels: int) -> None:
    """BadAudio unless `pcm` holds whole 16-bit samples for every channel."""
    if len(pcm) % (2 * channels):
        raise BadAudio(f"PCM16 chunk of {len(pcm)} bytes is not a multiple of {2 * channels} bytes")


def pcm16_to_float(pcm: bytes, channels: int = 1) -> AudioArray:
    """Signed 16-bit little-endian interleaved PCM -> mono float32 (channels averaged)."""
    check_pcm16_length(pcm, channels)
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(_PCM_SCALE)
    if channels > 1:
        mono: AudioArray = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
        return mono
    return samples


def float_to_pcm16(a: AudioArray) -> bytes:
    """float32 in [-1, 1] -> signed 16-bit little-endian PCM (clipped, rounded)."""
    scaled = np.round(np.asarray(a, dtype=np.float32) * np.float32(_PCM_SCALE))
    return np.clip(scaled, -32768, 32767).astype("<i2").tobytes()


def frames(a: AudioArray, frame_ms: int = FRAME_MS) -> Iterator[bytes]:
    """Split 16 kHz mono audio into PCM16 frames; the last one is zero-padded."""
    size = SAMPLE_RATE * frame_ms // 1000
    if size <= 0:
        raise ValueError("frame_ms too small")
    pcm = float_to_pcm16(a)
    step = 2 * size
    for start in range(0, len(pcm), step):
        chunk = pcm[start : start + step]
        yield chunk if len(chunk) == step else chunk + bytes(step - len(chunk))


def split_clips(a: AudioArray, max_seconds: float = 30.0) -> list[AudioArray]:
    """Cut audio into consecutive clips of at most `max_seconds` (the encoder's window)."""
    size = round(max_seconds * SAMPLE_RATE)
    if size <= 0:
        raise ValueError("max_seconds must be positive")
    return [a[i : i + size] for i in range(0, len(a), size)]


def silence(seconds: float) -> AudioArray:
    """Digital silence at 16 kHz."""
    return np.zeros(round(seconds * SAMPLE_RATE), dtype=np.float32)


def duration_ms(a: AudioArray) -> int:
    """Length of 16 kHz audio in whole milliseconds."""
    return len(a) * 1000 // SAMPLE_RATE


def _existing_file(path: str | os.PathLike[str]) -> str:
    name = os.fspath(path)
    if os.path.isdir(name):
        raise BadAudio(f"not a file: {name}")
    if not os.path.isfile(name):
        raise BadAudio(f"no such file: {name}")
    return name


def read_wav_pcm16(path: str | os.PathLike[str]) -> tuple[bytes, int, int]:
    """Read an audio file as it is: (interleaved PCM16 LE bytes, rate, channels)."""
    name = _existing_file(path)
    try:
        data, rate = sf.read(name, dtype="int16", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as exc:
        raise BadAudio(f"cannot decode audio: {_clean_reason(exc)}") from None
    if data.shape[0] == 0:
        raise BadAudio("audio is empty")
    return np.ascontiguousarray(data).astype("<i2").tobytes(), int(rate), int(data.shape[1])


class StreamResampler:
    """PCM16 interleaved at any supported rate/channels in, 16 kHz mono float32 out.

    Output sample k is the value at time k / 16000 of the input stream (soxr
    trims its filter delay), so positions computed from output counts line up
    with input time. Output lags input by `soxr.ResampleStream.delay()`;
    `flush()` returns the rest at the end of the stream. Chunking does not
    change the output: any split of the input gives the same samples.
    """

    def __init__(self, in_rate: int, channels: int = 1) -> None:
        validate_format(in_rate, channels)
        self.in_rate = in_rate
        self.channels = channels
        self.in_samples = 0  # per channel
        self.out_samples = 0
        self._stream: soxr.ResampleStream | None = None
        if in_rate != SAMPLE_RATE:
            self._stream = soxr.ResampleStream(in_rate, SAMPLE_RATE, 1, dtype="float32")

    @property
    def passthrough(self) -> bool:
        """True when no resampling happens (16 kHz input)."""
        return self._stream is None

    def process(self, pcm: bytes) -> AudioArray:
        """Convert one chunk; BadAudio (nothing consumed) on a partial sample."""
        mono = pcm16_to_float(pcm, self.channels)
        self.in_samples += len(mono)
        out = mono if self._stream is None else self._run(mono, last=False)
        self.out_samples += len(out)
        return out

    def flush(self) -> AudioArray:
        """The samples still inside the resampler (end of stream)."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._run(np.zeros(0, dtype=np.float32), last=True)
        self.out_samples += len(out)
        return out

    def _run(self, mono: AudioArray, last: bool) -> AudioArray:
        assert self._stream is not None
        out = self._stream.resample_chunk(mono, last=last)
        return np.clip(np.asarray(out, dtype=np.float32), -1.0, 1.0)
