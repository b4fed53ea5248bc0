"""The outbox of one WebSocket: bounded in count and in bytes for a client
that does not read (a fake connection whose send never returns)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from voice_agent.transports.websocket.outbox import SEND_QUEUE_BYTES, Outbox


class StuckPeer:
    """A connection to a client that stopped reading: send() takes the first
    message and then never returns (the write buffer is full)."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []
        self._never = asyncio.Event()

    async def send(self, data: str | bytes) -> None:
        self.sent.append(data)
        await self._never.wait()


def outbox(peer: StuckPeer, size: int = 512, **kwargs: Any) -> Outbox:
    box = Outbox(cast(Any, peer), size, **kwargs)
    box.start()
    return box


async def test_audio_for_a_client_that_does_not_read_stays_under_half_the_bytes() -> None:
    peer = StuckPeer()
    box = outbox(peer, max_bytes=64 * 1024)
    frame = bytes(3840)  # 40 ms at 48 kHz
    most = 0

    async def speak() -> None:
        nonlocal most
        for _ in range(200):  # 7.7 MB: far more than the bound
            await box.put_audio(frame)
            most = max(most, box.queued_bytes)

    task = asyncio.create_task(speak())
    await asyncio.sleep(0.05)
    assert not task.done()  # the speaker waits for room ...
    assert 0 < most <= 32 * 1024  # ... with at most half of the bytes queued
    assert box.put(b"x" * 1000)  # events still find room
    task.cancel()
    await box.close()


async def test_events_beyond_the_bytes_are_refused() -> None:
    peer = StuckPeer()
    box = outbox(peer, max_bytes=10_000)
    event = "e" * 1000
    results = [box.put(event) for _ in range(30)]
    await asyncio.sleep(0)
    assert results[:10] == [True] * 10
    assert False in results  # full: the connection closes the client (1008)
    assert box.queued_bytes <= 10_000
    await box.close()


async def test_one_large_event_fits_an_empty_queue_and_the_default_bound() -> None:
    box = outbox(StuckPeer(), max_bytes=100)
    await asyncio.sleep(0)
    assert box.put("x" * 500)  # nothing queued: taken (an attentive client gets it)
    assert not box.put("y")
    assert Outbox(cast(Any, StuckPeer()), 8).max_bytes == SEND_QUEUE_BYTES
    await box.close()


async def test_bytes_are_given_back_as_the_client_reads() -> None:
    class Reader(StuckPeer):
        async def send(self, data: str | bytes) -> None:
            self.sent.append(data)

    peer = Reader()
    box = outbox(peer, max_bytes=4096)
    for _ in range(20):
        await box.put_audio(bytes(1000))
    await box.flush(5)
    assert box.queued_bytes == 0 and len(peer.sent) == 20
    await box.close()
