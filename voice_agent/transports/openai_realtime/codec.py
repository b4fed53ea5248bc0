"""Audio on the OpenAI Realtime wire (pure): base64, G.711 and the formats.

GA audio formats: `audio/pcm` (PCM16 little-endian mono at 24 kHz, the only
rate the GA API allows), `audio/pcmu` (G.711 mu-law, 8 kHz) and `audio/pcma`
(G.711 A-law, 8 kHz). Input is decoded here to PCM16 at the format's rate; the
Session resamples it to 16 kHz with soxr (voice_agent/audio.py) as it does
for any native client. Output is spoken at the format's rate by the host's
speaker and encoded here (G.711) before it is base64'd into
`response.output_audio.delta`.
"""

from __future__ import annotations

import base64
import binascii

import numpy as np

from voice_agent.errors import BadAudio, InvalidField

PCM_RATE = 24000  # audio/pcm: the GA API's one rate
G711_RATE = 8000
FORMATS = {"audio/pcm": PCM_RATE, "audio/pcmu": G711_RATE, "audio/pcma": G711_RATE}
# The retired beta names, accepted as aliases (some clients still send them).
FORMAT_ALIASES = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


def _ulaw_table() -> np.ndarray:
    u = ~np.arange(256, dtype=np.int32) & 0xFF
    exponent = (u >> 4) & 7
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(u & 0x80, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 7
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0)
    )
    return np.where(a & 0x80, magnitude, -magnitude).astype(np.int16)


ULAW = _ulaw_table()  # code -> PCM16 sample
ALAW = _alaw_table()


def _encoder(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(table, kind="stable")
    return table[order].astype(np.int32), order.astype(np.uint8)


_ENCODERS = {"audio/pcmu": _encoder(ULAW), "audio/pcma": _encoder(ALAW)}


def g711_decode(data: bytes, fmt: str) -> bytes:
    """G.711 bytes (`audio/pcmu` or `audio/pcma`) -> PCM16 little-endian, same rate."""
    table = ULAW if fmt == "audio/pcmu" else ALAW
    return table[np.frombuffer(data, dtype=np.uint8)].astype("<i2").tobytes()


def g711_encode(pcm: bytes, fmt: str) -> bytes:
    """PCM16 little-endian -> G.711 (`audio/pcmu` or `audio/pcma`): the nearest code."""
    values, codes = _ENCODERS[fmt]
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.int32)
    i = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
    nearer_left = (x - values[i - 1]) <= (values[i] - x)
    return codes[np.where(nearer_left, i - 1, i)].tobytes()


def b64decode(data: str, param: str) -> bytes:
    """Strict base64 (InvalidField naming `param` otherwise)."""
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidField(f"{param} is not valid base64", param) from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def to_pcm16(data: bytes, fmt: str) -> bytes:
    """Client audio in `fmt` -> PCM16 at FORMATS[fmt] Hz (BadAudio on an odd
    PCM byte count)."""
    if fmt == "audio/pcm":
        if len(data) % 2:
            raise BadAudio("audio/pcm needs an even number of bytes (16-bit samples)")
        return data
    return g711_decode(data, fmt)


def from_pcm16(pcm: bytes, fmt: str) -> bytes:
    """Spoken PCM16 (at FORMATS[fmt] Hz) -> the output format's bytes."""
    return pcm if fmt == "audio/pcm" else g711_encode(pcm, fmt)


def parse_format(value: object, param: str) -> str:
    """A GA audio format object ({"type": "audio/pcm", "rate": 24000}) or a
    beta format string -> the canonical type name."""
    if isinstance(value, str):
        kind: object = FORMAT_ALIASES.get(value, value)
        rate: object = None
    elif isinstance(value, dict):
        kind = value.get("type")
        rate = value.get("rate")
    else:
        raise InvalidField(f"{param} must be an object", param)
    if kind not in FORMATS:
        raise InvalidField(
            f"{param}.type must be one of audio/pcm, audio/pcmu, audio/pcma", f"{param}.type"
        )
    assert isinstance(kind, str)
    if kind == "audio/pcm" and rate not in (None, PCM_RATE):
        raise InvalidField(f"{param}.rate must be 24000 for audio/pcm", f"{param}.rate")
    return kind


def format_object(fmt: str) -> dict[str, object]:
    """The GA format object of a canonical format name."""
    if fmt == "audio/pcm":
        return {"type": fmt, "rate": PCM_RATE}
    return {"type": fmt}
