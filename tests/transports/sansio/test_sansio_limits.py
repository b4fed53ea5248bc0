"""Bounds of the sans-I/O server: max_size (1009), read back-pressure when
max_queue messages wait, write flow control (send waits while the transport
is paused), and the Inbox queue itself without a network."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConcurrencyError, ConnectionClosedError

from tests.helpers.waiting import until
from tests.transports.sansio.support import WAIT, Handed, running
from voice_agent.transports.sansio import Connection
from voice_agent.transports.sansio.inbox import Inbox


async def test_a_message_over_max_size_closes_with_1009() -> None:
    handed = Handed()
    async with running(handed, max_size=1000) as (_, url), connect(url) as ws:
        connection = await handed.next()
        await ws.send(b"x" * 1000)  # at the limit: fine
        assert await asyncio.wait_for(connection.recv(), WAIT) == b"x" * 1000
        await ws.send(b"x" * 1001)
        with pytest.raises(ConnectionClosedError) as caught:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 1009
        # close_code is the code received, as in websockets: after failing the
        # connection the server reads no more, so it is 1006 here.
        await asyncio.wait_for(connection.wait_closed(), WAIT)
        with pytest.raises(ConnectionClosedError):
            await connection.recv()


async def test_a_fragmented_message_over_max_size_closes_with_1009() -> None:
    async def handler(connection: Connection) -> None:
        async for _ in connection:
            pass

    async with running(handler, max_size=1000) as (_, url), connect(url) as ws:
        await ws.send([b"x" * 600, b"x" * 600])
        with pytest.raises(ConnectionClosedError) as caught:
            await asyncio.wait_for(ws.recv(), WAIT)
        assert caught.value.rcvd is not None
        assert caught.value.rcvd.code == 1009


async def test_reading_pauses_while_max_queue_messages_wait() -> None:
    handed = Handed()
    count = 300
    async with running(handed, max_queue=4) as (_, url), connect(url) as ws:
        connection = await handed.next()
        for i in range(count):
            await ws.send(i.to_bytes(2, "big") * 512)
        # Nobody reads: the queue fills and reading from the socket stops.
        await until(lambda: connection.reading_paused)
        assert connection.read_pauses >= 1
        assert connection.queued < count  # the rest waits in the socket, not in memory
        got = [await asyncio.wait_for(connection.recv(), WAIT) for _ in range(count)]
        assert got == [i.to_bytes(2, "big") * 512 for i in range(count)]
        assert not connection.reading_paused
        assert connection.queued == 0
        handed.release()


async def test_send_waits_while_the_transport_is_paused() -> None:
    handed = Handed()
    payload = b"p" * 16384
    sent = 0

    async with (
        running(handed, write_limit=16384) as (_, url),
        # The client keeps at most one message and then stops reading.
        connect(url, max_queue=1) as ws,
    ):
        connection = await handed.next()

        async def pump() -> None:
            nonlocal sent
            for _ in range(2000):  # bounded: far more than the socket buffers hold
                await connection.send(payload)
                sent += 1

        task = asyncio.create_task(pump())
        await until(lambda: connection.writing_paused)
        # The peer does not read, so the send in progress cannot finish.
        for _ in range(20):
            await asyncio.sleep(0)
        assert not task.done()
        stuck_at = sent
        assert stuck_at < 2000
        # The client reads everything: the pump runs to the end.
        for _ in range(2000):
            assert await asyncio.wait_for(ws.recv(), WAIT) == payload
        await asyncio.wait_for(task, WAIT)
        assert sent == 2000
        handed.release()


# -- the Inbox alone -----------------------------------------------------------


class Switch:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


async def test_inbox_pauses_at_max_queue_and_resumes_at_a_quarter() -> None:
    switch = Switch()
    inbox = Inbox(asyncio.get_running_loop(), 8, switch.pause, switch.resume)
    for i in range(7):
        inbox.put(str(i))
    assert switch.calls == []
    inbox.put("7")
    assert switch.calls == ["pause"]
    assert inbox.paused
    inbox.put("8")  # already paused: counted once
    assert inbox.pauses == 1
    got = [await inbox.get() for _ in range(6)]
    assert got == [str(i) for i in range(6)]
    assert switch.calls == ["pause"]  # 3 left: above a quarter of 8
    assert await inbox.get() == "6"
    assert switch.calls == ["pause", "resume"]
    assert not inbox.paused


async def test_inbox_hands_over_to_a_waiting_reader_and_closes() -> None:
    switch = Switch()
    inbox = Inbox(asyncio.get_running_loop(), None, switch.pause, switch.resume)
    reader = asyncio.create_task(inbox.get())
    await until(lambda: inbox.waiting)
    with pytest.raises(ConcurrencyError):
        await inbox.get()
    inbox.put(b"a")
    assert not inbox.waiting  # a message is on its way to the reader
    assert await reader == b"a"
    inbox.put(b"b")
    inbox.close()
    assert await inbox.get() == b"b"  # queued messages are still read
    with pytest.raises(EOFError):
        await inbox.get()
    assert switch.calls == []  # unbounded: never paused


async def test_inbox_get_can_be_cancelled_without_losing_a_message() -> None:
    inbox = Inbox(asyncio.get_running_loop(), 4, lambda: None, lambda: None)
    reader = asyncio.create_task(inbox.get())
    await until(lambda: inbox.waiting)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert not inbox.waiting
    inbox.put("kept")
    assert await inbox.get() == "kept"
