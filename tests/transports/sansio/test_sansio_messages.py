"""Messages through the sans-I/O server with the real websockets client:
echo, fragments, and the audio fast path (when it takes a frame, order kept,
a failing or declining sink)."""

from __future__ import annotations

import asyncio
import logging

import pytest
from websockets.asyncio.client import connect

from tests.helpers.waiting import until
from tests.transports.sansio.support import (
    WAIT,
    Handed,
    client_frame,
    close_code,
    port_of,
    raw_frame,
    raw_open,
    running,
)
from voice_agent.transports.sansio import Connection


async def echo(connection: Connection) -> None:
    async for message in connection:
        await connection.send(message)


async def test_text_and_binary_echo() -> None:
    async with running(echo) as (_, url), connect(url) as ws:
        await ws.send("héllo")
        assert await asyncio.wait_for(ws.recv(), WAIT) == "héllo"
        await ws.send(b"\x00\x01\xff")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"\x00\x01\xff"
        big = bytes(range(256)) * 1000  # several reads on the server side
        await ws.send(big)
        assert await asyncio.wait_for(ws.recv(), WAIT) == big


async def test_fragmented_messages_are_assembled() -> None:
    async with running(echo) as (_, url), connect(url) as ws:
        await ws.send(["frag", "ment", "ed ✓"])
        assert await asyncio.wait_for(ws.recv(), WAIT) == "fragmented ✓"
        await ws.send([b"\x01\x02", b"", b"\x03"])
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"\x01\x02\x03"


async def test_sink_takes_binary_while_the_handler_waits_in_recv() -> None:
    taken: list[bytes] = []
    seen: list[str | bytes] = []

    def sink(data: bytes) -> bool:
        taken.append(data)
        return True

    async def handler(connection: Connection) -> None:
        connection.audio_sink = sink
        # send() of a small message returns without waiting, so the handler
        # is in recv() by the time the client reads "ready".
        await connection.send("ready")
        seen.append(await connection.recv())
        await connection.send(str(connection.fast_frames))

    async with running(handler) as (_, url), connect(url) as ws:
        assert await asyncio.wait_for(ws.recv(), WAIT) == "ready"
        for i in range(5):
            await ws.send(bytes([i]) * 640)
        await ws.send("stop")
        assert await asyncio.wait_for(ws.recv(), WAIT) == "5"
    assert taken == [bytes([i]) * 640 for i in range(5)]
    assert seen == ["stop"]


async def test_queued_messages_keep_their_order_and_skip_the_sink() -> None:
    handed = Handed()
    taken: list[bytes] = []

    def sink(data: bytes) -> bool:
        taken.append(data)
        return True

    async with running(handed) as (_, url), connect(url) as ws:
        connection = await handed.next()
        connection.audio_sink = sink
        await ws.send("first")
        await ws.send(b"\x01\x02")
        await ws.send("last")
        await until(lambda: connection.queued == 3)  # nobody waits in recv()
        got = [await asyncio.wait_for(connection.recv(), WAIT) for _ in range(3)]
        assert got == ["first", b"\x01\x02", "last"]
        assert taken == []
        assert connection.fast_frames == 0
        handed.release()


async def test_order_is_kept_whichever_path_each_message_takes() -> None:
    """Text and binary interleaved at full speed: each binary message goes to
    the sink or through recv() depending on timing, but the combined record
    is always the order the client sent."""
    record: list[str | bytes] = []
    done = asyncio.Event()

    def sink(data: bytes) -> bool:
        record.append(data)
        return True

    async def handler(connection: Connection) -> None:
        connection.audio_sink = sink
        while True:
            message = await connection.recv()
            record.append(message)
            if message == "end":
                done.set()
                return

    sent: list[str | bytes] = []
    for i in range(60):
        sent.append(f"t{i}" if i % 3 == 0 else bytes([i % 256]) * 320)
    sent.append("end")
    async with running(handler) as (_, url), connect(url) as ws:
        for message in sent:
            await ws.send(message)
        await asyncio.wait_for(done.wait(), WAIT)
    assert record == sent


async def test_a_sink_that_raises_does_not_drop_the_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def sink(data: bytes) -> bool:
        raise RuntimeError("broken sink")

    async def handler(connection: Connection) -> None:
        connection.audio_sink = sink
        await connection.send("ready")
        async for message in connection:
            await connection.send(message)

    caplog.set_level(logging.ERROR, logger="voice_agent.transports.sansio")
    async with running(handler) as (_, url), connect(url) as ws:
        assert await asyncio.wait_for(ws.recv(), WAIT) == "ready"
        await ws.send(b"audio")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"audio"
        await ws.send("still open")
        assert await asyncio.wait_for(ws.recv(), WAIT) == "still open"
    failures = [r for r in caplog.records if r.getMessage().startswith("audio sink failed")]
    assert failures
    assert "audio" not in str(failures[0].__dict__.get("bytes"))  # a size, not the payload


async def test_a_sink_returning_false_delivers_through_recv() -> None:
    offered: list[bytes] = []

    def sink(data: bytes) -> bool:
        offered.append(data)
        return False

    async def handler(connection: Connection) -> None:
        connection.audio_sink = sink
        await connection.send("ready")
        message = await connection.recv()
        await connection.send(message)
        await connection.send(str(connection.fast_frames))

    async with running(handler) as (_, url), connect(url) as ws:
        assert await asyncio.wait_for(ws.recv(), WAIT) == "ready"
        await ws.send(b"declined")
        assert await asyncio.wait_for(ws.recv(), WAIT) == b"declined"
        assert await asyncio.wait_for(ws.recv(), WAIT) == "0"
    assert offered == [b"declined"]


async def test_invalid_utf8_text_closes_with_1007() -> None:
    async with running(echo) as (_, url):
        reader, writer = await raw_open(port_of(url))
        writer.write(client_frame(0x1, b"\xff\xfe"))
        opcode, payload = await raw_frame(reader)
        assert opcode == 0x8
        assert close_code(payload) == 1007
        writer.close()
