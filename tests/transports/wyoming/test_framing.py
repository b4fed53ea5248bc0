"""framing: Wyoming events read with bounds (a StreamReader fed by hand, no network)."""

from __future__ import annotations

import asyncio
import json

import pytest
from wyoming.audio import AudioChunk
from wyoming.event import Event

from tests.transports.wyoming.support import wire
from voice_agent.errors import to_wire
from voice_agent.transports.wyoming.framing import (
    FrameError,
    Limits,
    Vanished,
    merge_data,
    parse_header,
    read_event,
)


def reader_of(raw: bytes, limit: int = 64 * 1024) -> asyncio.StreamReader:
    reader = asyncio.StreamReader(limit=limit)
    reader.feed_data(raw)
    reader.feed_eof()
    return reader


async def test_events_round_trip_with_data_and_payload() -> None:
    chunk = AudioChunk(rate=16000, width=2, channels=1, audio=b"\x01\x02" * 100).event()
    reader = reader_of(wire(chunk) + wire(Event("describe")))
    got = await read_event(reader)
    assert got is not None and got.type == "audio-chunk"
    assert AudioChunk.from_event(got).audio == b"\x01\x02" * 100
    assert AudioChunk.from_event(got).rate == 16000
    described = await read_event(reader)
    assert described is not None and described.type == "describe" and described.data == {}
    assert await read_event(reader) is None  # closed between events


async def test_data_in_the_header_line_is_merged_with_data_length_bytes() -> None:
    raw = json.dumps({"type": "transcribe", "data": {"language": "en"}, "data_length": 13})
    reader = reader_of(raw.encode() + b"\n" + b'{"name": "x"}')
    got = await read_event(reader)
    assert got is not None and got.data == {"language": "en", "name": "x"}


@pytest.mark.parametrize(
    "line",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"data": {}}\n',
        b'{"type": ""}\n',
        b'{"type": 5}\n',
        b'{"type": "x", "data": [1]}\n',
        b'{"type": "x", "data_length": -1}\n',
        b'{"type": "x", "payload_length": "10"}\n',
        b'{"type": "x", "payload_length": true}\n',
        b'{"type": "x", "payload_length": 2000000}\n',
        b'{"type": "x", "data_length": 70000}\n',
        b"\xff\xfe\n",
    ],
)
async def test_malformed_or_oversized_headers_are_frame_errors(line: bytes) -> None:
    with pytest.raises(FrameError) as caught:
        await read_event(reader_of(line + b"x" * 10))
    assert to_wire(caught.value).code == "bad_message"


async def test_a_header_line_over_the_limit_is_a_frame_error() -> None:
    reader = reader_of(b'{"type": "' + b"a" * 5000 + b'"}\n', limit=1024)
    with pytest.raises(FrameError, match="longer than"):
        await read_event(reader, Limits(header=1024))


async def test_data_that_is_not_a_json_object_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        await read_event(reader_of(b'{"type": "x", "data_length": 3}\n[1]'))
    with pytest.raises(FrameError):
        merge_data({}, b"nope")


async def test_a_client_gone_inside_an_event_has_vanished() -> None:
    chunk = AudioChunk(rate=16000, width=2, channels=1, audio=b"\x00" * 640).event()
    with pytest.raises(Vanished):
        await read_event(reader_of(wire(chunk)[:-100]))
    with pytest.raises(Vanished):
        await read_event(reader_of(b'{"type": "descr'))


def test_parse_header_gives_the_lengths() -> None:
    assert parse_header(b'{"type": "a", "data_length": 2, "payload_length": 4}') == (
        "a",
        {},
        2,
        4,
    )
