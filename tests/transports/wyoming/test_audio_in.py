"""audio_in: Wyoming audio formats in, 16 kHz mono float out (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from voice_agent.errors import BadAudio
from voice_agent.transports.wyoming.audio_in import AudioFormat, AudioIn, audio_format, to_float


def tone(rate: int, seconds: float = 0.5, hz: float = 440.0) -> np.ndarray:
    t = np.arange(round(rate * seconds)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def encode(a: np.ndarray, width: int, channels: int = 1) -> bytes:
    """Float mono -> interleaved PCM of `width` bytes (the same on every channel)."""
    if width == 1:
        pcm = np.clip(np.round(a * 128 + 128), 0, 255).astype(np.uint8)
    elif width == 2:
        pcm = np.round(a * 32767).astype("<i2")
    elif width == 3:
        v = np.round(a * (2**23 - 1)).astype(np.int32)
        b = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], axis=1).astype(np.uint8)
        pcm = b.reshape(-1)
        if channels > 1:
            pcm = np.repeat(b[:, None, :], channels, axis=1).reshape(-1)
        return pcm.tobytes()
    else:
        pcm = np.round(a.astype(np.float64) * (2**31 - 1)).astype("<i4")
    if channels > 1:
        pcm = np.repeat(pcm[:, None], channels, axis=1).reshape(-1)
    return pcm.tobytes()


@pytest.mark.parametrize("width", [1, 2, 3, 4])
@pytest.mark.parametrize("channels", [1, 2, 6])
def test_every_width_and_channel_count_decodes_to_the_same_mono_signal(
    width: int, channels: int
) -> None:
    a = tone(16000)
    out = to_float(encode(a, width, channels), AudioFormat(16000, width, channels))
    assert out.dtype == np.float32 and len(out) == len(a)
    tolerance = 1 / 100 if width == 1 else 1 / 10000
    assert float(np.max(np.abs(out - a))) < tolerance


def test_signed_24_bit_negative_values() -> None:
    pcm = bytes([0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x80])  # -1, -2**23
    out = to_float(pcm, AudioFormat(16000, 3, 1))
    assert out[0] == pytest.approx(-1 / 2**23)
    assert out[1] == pytest.approx(-1.0)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_stream_at_any_rate_comes_out_at_16_khz(rate: int) -> None:
    stream = AudioIn(audio_format(rate, 2, 2))
    pcm = encode(tone(rate, 1.0), 2, 2)
    for i in range(0, len(pcm), 4096):
        stream.add(pcm[i : i + 4096], AudioFormat(rate, 2, 2))
    assert stream.ms == 1000
    out = stream.finish()
    assert abs(len(out) - 16000) <= 2
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(int(np.argmax(spectrum)) * 16000 / len(out) - 440) < 5  # the tone survived


@pytest.mark.parametrize(
    ("rate", "width", "channels"),
    [
        (7999, 2, 1),
        (48001, 2, 1),
        (16000, 0, 1),
        (16000, 5, 1),
        (16000, 2, 0),
        (16000, 2, 9),
        ("16000", 2, 1),
        (16000, True, 1),
        (None, 2, 1),
        (16000.0, 2, 1),
    ],
)
def test_unsupported_formats_are_bad_audio(rate: object, width: object, channels: object) -> None:
    with pytest.raises(BadAudio):
        audio_format(rate, width, channels)


def test_partial_frames_another_format_and_too_much_audio_are_refused() -> None:
    stream = AudioIn(AudioFormat(16000, 2, 2), max_ms=1000)
    with pytest.raises(BadAudio, match="whole frames"):
        stream.add(b"\x00" * 6)  # 1.5 stereo frames
    with pytest.raises(BadAudio, match="differs"):
        stream.add(b"\x00" * 4, AudioFormat(16000, 2, 1))
    stream.add(b"\x00" * 64000)  # exactly 1 s
    with pytest.raises(BadAudio, match="longer than 1 s"):
        stream.add(b"\x00" * 4)
    assert stream.size == 64000


def test_an_empty_stream_is_an_empty_clip() -> None:
    assert len(AudioIn(AudioFormat(22050, 2, 1)).finish()) == 0
