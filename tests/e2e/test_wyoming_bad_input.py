"""Bad Wyoming input, each while another client is in the middle of a Home
Assistant transcription on the same server: unknown events, audio before
audio-start, impossible audio formats, oversized data or payloads, bytes
that are no event, a client that vanishes mid-stream. Each gets an `error`
event or a closed connection, is counted in /metrics
(voice_agent_transport_errors_total{transport="wyoming"} or the
voice_agent_wyoming_* bad-input counters), and the other
client still gets its transcript.

A scripted engine answers (the transcription turn's text is its script):
the bad input never reaches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from wyoming.asr import Transcribe
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event, async_write_event
from wyoming.ping import Ping, Pong

from tests.e2e.wyoming_support import (
    WAIT,
    Pcm,
    Server,
    describe,
    handle,
    handled_text,
    pieces,
    raw_read,
    read_until,
    recording,
    send_audio,
    start_transcription,
    synthesize,
    transcribe,
    transcript_of,
    types,
    until_errors_above,
    wyoming_errors,
    wyoming_server,
)
from voice_agent.engine.scripted import ScriptedEngine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Misbehave = Callable[[Streams], Awaitable[None]]


def _chunk(audio: bytes = bytes(640)) -> Event:
    return AudioChunk(rate=16000, width=2, channels=1, audio=audio).event()


async def _write(streams: Streams, *events: Event) -> None:
    for event in events:
        await async_write_event(event, streams[1])


async def _raw(streams: Streams, data: bytes) -> None:
    streams[1].write(data)
    await streams[1].drain()


async def unknown_event(s: Streams) -> None:
    await _write(s, Event(type="no-such-event", data={"x": 1}))


async def audio_before_start(s: Streams) -> None:
    await _write(s, Transcribe(language="en").event(), _chunk())


async def stop_before_start(s: Streams) -> None:
    await _write(s, Transcribe(language="en").event(), AudioStop().event())


async def wrong_width(s: Streams) -> None:
    start = AudioStart(rate=16000, width=5, channels=1).event()
    await _write(s, Transcribe(language="en").event(), start)
    await _write(s, AudioChunk(rate=16000, width=5, channels=1, audio=bytes(800)).event())


async def wrong_rate(s: Streams) -> None:
    await _write(s, Transcribe(language="en").event(), AudioStart(0, 2, 1).event())
    await _write(s, AudioChunk(rate=0, width=2, channels=1, audio=bytes(640)).event())


async def chunk_format_changes(s: Streams) -> None:
    """audio-start says 16 kHz mono, the chunk is 3 bytes of 2-byte samples."""
    start = AudioStart(rate=16000, width=2, channels=1).event()
    await _write(s, Transcribe(language="en").event(), start, _chunk(bytes(3)))


async def oversized_payload(s: Streams) -> None:
    """A header announcing a 1 GiB payload; the bytes never come."""
    start = AudioStart(rate=16000, width=2, channels=1).event()
    await _write(s, Transcribe(language="en").event(), start)
    header = {"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}}
    await _raw(s, json.dumps({**header, "payload_length": 1 << 30}).encode() + b"\n")
    await _raw(s, bytes(64 * 1024))


async def oversized_data(s: Streams) -> None:
    await _raw(s, json.dumps({"type": "describe", "data_length": 1 << 30}).encode() + b"\n")
    await _raw(s, b"{" + b" " * (64 * 1024))


async def endless_line(s: Streams) -> None:
    """A header line that never ends (8 MiB without a newline)."""
    for _ in range(128):
        await _raw(s, b"x" * 65536)


async def too_much_audio(s: Streams) -> None:
    """31 s of audio in one stream (the model hears at most 30 s)."""
    start = AudioStart(rate=16000, width=2, channels=1).event()
    await _write(s, Transcribe(language="en").event(), start)
    for _ in range(310):
        await _write(s, _chunk(bytes(3200)))
    await _write(s, AudioStop().event())


async def not_json(s: Streams) -> None:
    await _raw(s, b"this is not an event\n")


BAD = [
    unknown_event,
    audio_before_start,
    stop_before_start,
    wrong_width,
    wrong_rate,
    chunk_format_changes,
    oversized_payload,
    oversized_data,
    endless_line,
    too_much_audio,
    not_json,
]


async def _answer(streams: Streams) -> str:
    """What the misbehaving client got: an `error` (its code) or the close."""
    for _ in range(1000):
        event = await raw_read(streams[0])
        if event is None:
            return "closed"
        if event.type == "error":
            assert isinstance(event.data.get("text"), str), event.data
            return f"error {event.data.get('code')}"
    raise AssertionError("neither an error nor a close")


async def _with_a_busy_neighbour(
    server: Server, pcm: Pcm, bad: Callable[[], Awaitable[None]]
) -> None:
    """A Home Assistant transcription half sent, then `bad`, then the rest:
    the neighbour's transcript comes as usual."""
    chunks = pieces(pcm)
    half = len(chunks) // 2
    async with server.client() as neighbour:
        await start_transcription(neighbour, pcm)
        await send_audio(neighbour, pcm, chunks[:half])
        await bad()
        await send_audio(neighbour, pcm, chunks[half:])
        await neighbour.write_event(AudioStop().event())
        transcript_of(await read_until(neighbour, "transcript"))


@pytest.fixture
def pcm(audio_dir: Path) -> Pcm:
    return recording(audio_dir / "ldc93s1-16k-mono.wav")


@pytest.mark.parametrize("misbehave", BAD, ids=lambda f: f.__name__)
async def test_bad_input_is_refused_and_counted(pcm: Pcm, misbehave: Misbehave) -> None:
    async with wyoming_server(ScriptedEngine(["Heard."])) as server:
        before = await wyoming_errors(server)
        answers: list[str] = []

        async def bad() -> None:
            streams = await asyncio.open_connection("127.0.0.1", server.port)
            try:
                with contextlib.suppress(ConnectionError):
                    async with asyncio.timeout(WAIT):  # a server that stops reading
                        await misbehave(streams)
                answers.append(await _answer(streams))
                # counted before this client goes (its going is not what is counted)
                await until_errors_above(server, before)
            finally:
                streams[1].close()
                with contextlib.suppress(ConnectionError):
                    await streams[1].wait_closed()

        await _with_a_busy_neighbour(server, pcm, bad)
    assert len(answers) == 1 and (answers[0] == "closed" or answers[0].startswith("error")), answers


async def test_a_client_that_vanishes_mid_stream(pcm: Pcm) -> None:
    """Transcribe, audio-start, some audio, half an audio-chunk event, then the
    socket is gone (reset, no audio-stop): counted; the neighbour is served,
    and so is a new client after it."""
    async with wyoming_server(ScriptedEngine(["Heard."])) as server:
        before = await wyoming_errors(server)

        async def vanish() -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            await _write((reader, writer), Transcribe(language="en").event())
            await _write((reader, writer), AudioStart(rate=16000, width=2, channels=1).event())
            for piece in pieces(pcm)[:50]:
                await _write((reader, writer), _chunk(piece))
            header = {"type": "audio-chunk", "data": {"rate": 16000, "width": 2, "channels": 1}}
            await _raw((reader, writer), json.dumps({**header, "payload_length": 640}).encode())
            await _raw((reader, writer), b"\n" + bytes(100))
            writer.transport.abort()  # an RST, as a satellite losing power

        await _with_a_busy_neighbour(server, pcm, vanish)
        await until_errors_above(server, before)
        async with server.client() as client:  # still serving
            await start_transcription(client, pcm)
            await send_audio(client, pcm, pieces(pcm))
            await client.write_event(AudioStop().event())
            transcript_of(await read_until(client, "transcript"))


async def test_an_error_leaves_the_connection_usable_or_closed(pcm: Pcm) -> None:
    """After an `error` answer the server either closed the connection or
    still serves it: a describe on the same connection then gets info."""
    async with wyoming_server(ScriptedEngine(["Heard."])) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            await unknown_event((reader, writer))
            answer = await _answer((reader, writer))
            if answer != "closed":
                await _write((reader, writer), Event(type="describe"))
                event = await raw_read(reader)
                assert event is None or event.type == "info", event
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


async def test_a_server_that_does_not_speak_refuses_synthesize() -> None:
    """With --tts none the info offers no tts program (Home Assistant then adds
    no text-to-speech entity), and a synthesize anyway gets an error."""
    async with wyoming_server(ScriptedEngine(["Heard."]), tts="none") as server:
        info = await describe(server)
        assert info.tts == [] and info.asr and info.handle, info
        events = await synthesize(server, "Hello.")
    assert events and events[-1].type == "error", types(events)
    assert not [e for e in events if e.type.startswith("audio-")], types(events)


async def test_ping_is_answered_with_pong() -> None:
    """Satellites and Home Assistant keep connections alive with ping/pong."""
    async with wyoming_server(ScriptedEngine(["Heard."])) as server, server.client() as client:
        await client.write_event(Ping(text="1").event())
        events = await read_until(client, "pong")
    assert types(events) == ["pong"], types(events)
    assert Pong.from_event(events[-1]).text == "1"


@pytest.mark.parametrize("request_kind", ["transcribe", "handle"])
async def test_a_client_that_vanishes_while_answered(pcm: Pcm, request_kind: str) -> None:
    """Home Assistant gives up on a pipeline (a timeout, the user cancels):
    the connection resets while the reply is still being written. The turn
    ends, that is counted, and the next client is served at once."""
    slow = " ".join(["word"] * 200)  # 200 tokens, 20 ms each: still running when the client goes
    engine = ScriptedEngine([slow], token_delay=0.02)
    async with wyoming_server(engine, max_new_tokens=256) as server:
        before = await wyoming_errors(server)
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        streams = (reader, writer)
        if request_kind == "transcribe":
            await _write(streams, Transcribe(language="en").event())
            await _write(streams, AudioStart(rate=16000, width=2, channels=1).event())
            await _write(streams, _chunk(pcm.audio), AudioStop().event())
            first = await raw_read(reader)  # the answer has begun
            assert first is not None and first.type.startswith("transcript"), first
        else:
            context = {"conversation_id": "01J000GONE"}
            await _write(streams, Event("transcript", {"text": "hi", "context": context}))
            async with asyncio.timeout(WAIT):  # the reply is being decoded (it takes 4 s)
                while not engine.submitted:
                    await asyncio.sleep(0.02)
        writer.transport.abort()
        await until_errors_above(server, before)
        engine.replies = ["Quick."]
        if request_kind == "transcribe":
            transcript_of(await transcribe(server, pcm))
        else:
            assert handled_text(await handle(server, "again", "01J000GONE")) == "Quick."
