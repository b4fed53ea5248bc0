"""codec.py: G.711, base64 and the GA audio formats."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from voice_agent.errors import BadAudio, InvalidField
from voice_agent.transports.openai_realtime import codec

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import audioop  # the standard library's G.711 (removed in 3.13)
    except ImportError:  # pragma: no cover
        audioop = None  # type: ignore[assignment]


@pytest.mark.skipif(audioop is None, reason="audioop is gone in this Python")
@pytest.mark.parametrize(("fmt", "name"), [("audio/pcmu", "ulaw2lin"), ("audio/pcma", "alaw2lin")])
def test_g711_decode_matches_the_standard_library(fmt: str, name: str) -> None:
    every_code = bytes(range(256))
    assert codec.g711_decode(every_code, fmt) == getattr(audioop, name)(every_code, 2)


@pytest.mark.parametrize("fmt", ["audio/pcmu", "audio/pcma"])
def test_g711_round_trip_is_within_one_step(fmt: str) -> None:
    pcm = (np.sin(np.arange(800) / 7.0) * 20000).astype("<i2").tobytes()
    back = np.frombuffer(codec.g711_decode(codec.g711_encode(pcm, fmt), fmt), "<i2")
    original = np.frombuffer(pcm, "<i2").astype(np.int32)
    # G.711 steps grow with the level: at most 1/16 of the sample plus a little.
    assert np.all(np.abs(back - original) <= np.abs(original) // 16 + 16)
    # every code's value encodes to a code of that same value (mu-law has two zeros)
    values = codec.g711_decode(bytes(range(256)), fmt)
    assert codec.g711_decode(codec.g711_encode(values, fmt), fmt) == values


def test_pcm_passes_through_and_odd_bytes_are_refused() -> None:
    assert codec.to_pcm16(b"\x01\x02", "audio/pcm") == b"\x01\x02"
    with pytest.raises(BadAudio):
        codec.to_pcm16(b"\x01", "audio/pcm")
    assert len(codec.to_pcm16(b"\xff\x7f", "audio/pcmu")) == 4


def test_base64_is_strict() -> None:
    assert codec.b64decode("AAE=", "audio") == b"\x00\x01"
    with pytest.raises(InvalidField) as err:
        codec.b64decode("not base64!", "audio")
    assert err.value.param == "audio"


def test_formats_parse_ga_objects_and_beta_names() -> None:
    assert codec.parse_format({"type": "audio/pcm", "rate": 24000}, "f") == "audio/pcm"
    assert codec.parse_format({"type": "audio/pcmu"}, "f") == "audio/pcmu"
    assert codec.parse_format("g711_alaw", "f") == "audio/pcma"
    with pytest.raises(InvalidField) as err:
        codec.parse_format({"type": "audio/pcm", "rate": 16000}, "f")
    assert err.value.param == "f.rate"
    with pytest.raises(InvalidField):
        codec.parse_format({"type": "audio/opus"}, "f")
    assert codec.format_object("audio/pcm") == {"type": "audio/pcm", "rate": 24000}
