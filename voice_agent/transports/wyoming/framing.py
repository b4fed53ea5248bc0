"""Wyoming framing, bounded: one event off a StreamReader, one onto a writer.

The wire is the `wyoming` package's (wyoming.event): a JSON header line
{"type", "data"?, "data_length"?, "payload_length"?, "version"?}, then
`data_length` bytes of JSON merged into `data`, then `payload_length` bytes of
payload. The package's own `async_read_event` reads whatever lengths the
header announces (a client could make the server buffer gigabytes) and turns
every malformed event into a silent end of stream, so events are read here
with limits and typed errors, into wyoming.event.Event; writing is the
package's `async_write_event`.

    read_event(reader, limits) -> Event | None    None: the client closed
        between events. FrameError (errors.BadMessage): malformed or too large;
        the stream cannot be resynchronised, the caller closes the connection.
        Vanished: the client closed in the middle of an event.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from wyoming.event import Event, async_write_event

from voice_agent.errors import BadMessage

MAX_HEADER_BYTES = 64 * 1024  # the header line (the StreamReader's limit)
MAX_DATA_BYTES = 64 * 1024  # data_length
MAX_PAYLOAD_BYTES = 1024 * 1024  # payload_length (an audio chunk: 1 s of 48 kHz stereo 32-bit fits)
MAX_TYPE_CHARS = 64


class FrameError(BadMessage):
    """A malformed or oversized event: answered with an error, then closed."""


class Vanished(ConnectionError):
    """The client closed the connection in the middle of an event."""


@dataclass(frozen=True)
class Limits:
    header: int = MAX_HEADER_BYTES
    data: int = MAX_DATA_BYTES
    payload: int = MAX_PAYLOAD_BYTES


LIMITS = Limits()


def _length(header: dict[str, Any], key: str, limit: int) -> int:
    value = header.get(key)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FrameError(f"{key} must be a non-negative integer")
    if value > limit:
        raise FrameError(f"{key} {value} is over the limit of {limit} bytes")
    return value


def parse_header(line: bytes, limits: Limits = LIMITS) -> tuple[str, dict[str, Any], int, int]:
    """(type, data, data_length, payload_length) of a header line (pure)."""
    try:
        header = json.loads(line)
    except (UnicodeDecodeError, ValueError):
        raise FrameError("event header is not JSON") from None
    if not isinstance(header, dict):
        raise FrameError("event header is not a JSON object")
    kind = header.get("type")
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_TYPE_CHARS:
        raise FrameError("event has no type")
    data = header.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise FrameError("event data is not a JSON object")
    return (
        kind,
        data,
        _length(header, "data_length", limits.data),
        _length(header, "payload_length", limits.payload),
    )


def merge_data(data: dict[str, Any], raw: bytes) -> dict[str, Any]:
    """`data` updated with the JSON object of `raw` (the data_length bytes)."""
    try:
        extra = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise FrameError("event data is not JSON") from None
    if not isinstance(extra, dict):
        raise FrameError("event data is not a JSON object")
    data.update(extra)
    return data


async def read_event(reader: asyncio.StreamReader, limits: Limits = LIMITS) -> Event | None:
    """The next event (see the module doc)."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise Vanished("connection closed inside an event header") from None
        return None
    except asyncio.LimitOverrunError:
        raise FrameError(f"event header is longer than {limits.header} bytes") from None
    if len(line) > limits.header:
        raise FrameError(f"event header is longer than {limits.header} bytes")
    kind, data, data_length, payload_length = parse_header(line, limits)
    try:
        if data_length:
            data = merge_data(data, await reader.readexactly(data_length))
        payload = await reader.readexactly(payload_length) if payload_length else None
    except asyncio.IncompleteReadError:
        raise Vanished("connection closed inside an event") from None
    return Event(type=kind, data=data, payload=payload)


async def write_event(event: Event, writer: asyncio.StreamWriter) -> None:
    """One event out (the wyoming package's writer), waiting for the buffer to drain."""
    await async_write_event(event, writer)
