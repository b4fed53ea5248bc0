"""The Wyoming server on the host: admission, the --db store, shutdown with
work in flight, idle connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest
from wyoming.asr import Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.error import Error
from wyoming.info import Describe
from wyoming.tts import Synthesize

from tests.helpers.devices import write_devices
from tests.helpers.ports import free_port
from tests.transports.wyoming.support import TIMEOUT, read_until, script, serving, wire
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.server import running
from voice_agent.store import Store


async def test_connections_past_max_sessions_are_refused_with_an_error(tmp_path: Path) -> None:
    async with serving(tmp_path, max_sessions=1) as served, served.client() as first:
        await first.write_event(Describe().event())
        await read_until(first, "info")  # holds the one place
        async with served.client() as second:
            (event,) = await read_until(second, "error")
            assert Error.from_event(event).code == "server_full"
            assert await asyncio.wait_for(second.read_event(), TIMEOUT) is None  # closed
        wyoming = served.services.wyoming
        assert wyoming is not None and wyoming.stats.refused == 1
    # the place is given back when the connection ends
    async with serving(tmp_path, max_sessions=1) as served:
        for _ in range(2):
            async with served.client() as client:
                await client.write_event(Describe().event())
                await read_until(client, "info")


async def test_conversations_are_kept_in_the_store(tmp_path: Path) -> None:
    db = tmp_path / "conversations.db"
    context = {"conversation_id": "01JABCDEF", "device_id": "hall"}
    async with serving(tmp_path, db=str(db)) as served, served.client() as client:
        for text in ("first", "second"):
            await client.write_event(Transcript(text, context=context).event())
            (event,) = await read_until(client, "handled", "not-handled")
            assert event.type == "handled"
    store = Store(db)
    try:
        record = store.load("wyoming:01JABCDEF")
        assert record is not None
        assert record.owner == "wyoming" and record.device == "hall"
        assert record.history.turns == 2
    finally:
        store.close()


async def test_shutdown_cancels_a_transcription_in_flight(tmp_path: Path) -> None:
    async with serving(tmp_path, token_delay=5.0) as served, served.client() as client:
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(
            AudioChunk(rate=16000, width=2, channels=1, audio=b"\x10\x00" * 16000).event()
        )
        await client.write_event(AudioStop().event())
        await read_until(client, "transcript-start")
        wyoming = served.services.wyoming
        assert wyoming is not None
        await asyncio.wait_for(wyoming.close(), TIMEOUT)
        assert await asyncio.wait_for(client.read_event(), TIMEOUT) is None
        assert wyoming.stats.open == 0


async def test_idle_connections_are_closed(tmp_path: Path) -> None:
    async with serving(tmp_path, idle_timeout=0.2) as served, served.client() as client:
        assert await asyncio.wait_for(client.read_event(), TIMEOUT) is None
        wyoming = served.services.wyoming
        assert wyoming is not None and wyoming.stats.idle_closed == 1


async def test_a_client_that_stops_reading_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voice_agent.transports.wyoming import handler

    monkeypatch.setattr(handler, "WRITE_TIMEOUT", 0.5)
    async with serving(tmp_path, tts_seconds=lambda text: len(text) / 20) as served:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", served.port))
        _reader, writer = await asyncio.open_connection(sock=sock)
        text = "Hi there. " * 900  # 450 s of audio: about 20 MB
        writer.write(wire(Synthesize(text=text).event()))
        await writer.drain()
        wyoming = served.services.wyoming
        assert wyoming is not None
        for _ in range(600):  # never reading
            if wyoming.stats.vanished:
                break
            await asyncio.sleep(0.05)
        assert wyoming.stats.vanished == 1 and wyoming.stats.open == 0
        writer.close()
        async with served.client() as other:  # the server serves on
            await other.write_event(Describe().event())
            await read_until(other, "info")


class _SlowStart(ScriptedEngine):
    """An engine whose start (the model load) waits for `loaded`."""

    def __init__(self) -> None:
        super().__init__(script)
        self.loaded = asyncio.Event()

    async def start(self) -> None:
        await self.loaded.wait()
        await super().start()


async def test_wyoming_answers_describe_while_the_model_loads(tmp_path: Path) -> None:
    """Home Assistant's set-up connects and asks `describe` at once: while the
    model loads the port is open, describe is answered and a request that needs
    the engine gets `loading`; once loaded, the same kind of request works."""
    port = free_port()
    config = Config(
        host="127.0.0.1",
        port=0,
        tts="none",
        db="none",
        devices=str(write_devices(tmp_path)),
        wyoming=f"tcp://127.0.0.1:{port}",
    )
    engine = _SlowStart()
    started = asyncio.Event()

    async def serve() -> None:
        async with running(config, engine):
            started.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(serve())
    try:
        client = AsyncTcpClient("127.0.0.1", port)
        for _ in range(200):  # the listener opens before the engine starts
            try:
                await client.connect()
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the Wyoming port did not open while the model loads")
        try:
            await client.write_event(Describe().event())
            (info,) = await read_until(client, "info")
            assert info.data["asr"], "describe is answered while loading"
            await client.write_event(Transcript("hello", context={"conversation_id": "c"}).event())
            (error,) = await read_until(client, "error")
            assert Error.from_event(error).code == "loading"
            assert await asyncio.wait_for(client.read_event(), TIMEOUT) is None  # closed
            assert not started.is_set()
        finally:
            await client.disconnect()
        engine.loaded.set()
        await asyncio.wait_for(started.wait(), TIMEOUT)
        async with AsyncTcpClient("127.0.0.1", port) as client:  # as HA does, per request
            await client.write_event(Transcript("hello", context={"conversation_id": "c"}).event())
            (event,) = await read_until(client, "handled", "not-handled")
            assert event.type == "handled"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
