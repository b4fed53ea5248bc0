"""Helpers of the Wyoming client tests (tests/e2e/test_wyoming_*.py): a
voice_agent server with `--wyoming` on loopback, and the `wyoming` package's
AsyncTcpClient playing the exact event sequences of Home Assistant's Wyoming
integration (home-assistant/core, homeassistant/components/wyoming/):

- data.py, load_wyoming_info: describe -> read until info;
- stt.py, async_process_audio_stream: transcribe(language), audio-start
  (16 kHz, 2 bytes, mono), one audio-chunk per piece of the stream,
  audio-stop -> read until transcript (other events are skipped);
- conversation.py, async_process: ONE transcript event (text, context with
  conversation_id, language) -> read until handled, not-handled or error;
- tts.py, async_get_tts_audio: synthesize(text, voice) -> read until
  audio-stop; async_stream_tts_audio: synthesize-start(voice),
  synthesize-chunk per piece, synthesize (the whole text again, "for
  backwards compatibility"), synthesize-stop, written by its own task while
  the audio is read until synthesize-stopped.

The tests are black-box: they know the wire (the wyoming events) and the
public server API (Config, voice_agent.server.running), never the
transport's modules.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import soundfile
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient
from wyoming.event import Event, async_read_event
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)

from tests.helpers.ports import free_port
from voice_agent.config import Config
from voice_agent.engine.base import Engine
from voice_agent.server import Services, running
from voice_agent.tts.speaker import Speech

# Home Assistant's Wyoming integration (const.py): what its STT sends
RATE, WIDTH, CHANNELS = 16000, 2, 1
CHUNK_MS = 10  # the assist pipeline's audio processing steps are 10 ms
MAX_TOKENS = 12
WAIT = 90.0  # generous: 2 shared cores, a real model
MAX_EVENTS = 100_000  # bound on every read loop


# ------------------------------------------------------------------ the server


@dataclass
class Server:
    services: Services
    port: int  # the Wyoming port

    @property
    def metrics_url(self) -> str:
        return f"{self.services.app.http_url}metrics"

    def client(self) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.port)


def config(wyoming_port: int, **fields: Any) -> Config:
    """The test server's config: loopback, no store, a short reply."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "db": "none",
        "max_new_tokens": MAX_TOKENS,
        "wyoming": f"tcp://127.0.0.1:{wyoming_port}",
    }
    return Config(**{**base, **fields})


@asynccontextmanager
async def wyoming_server(
    engine: Engine, *, speech: Speech | None = None, **fields: Any
) -> AsyncIterator[Server]:
    """A real voice_agent server (running(): every configured transport on
    one host) with its Wyoming server on a free loopback port; the engine
    stays open."""
    port = free_port()
    async with running(config(port, **fields), engine, close_engine=False, speech=speech) as s:
        yield Server(s, port)


# ------------------------------------------------------------------- the audio


@dataclass(frozen=True)
class Pcm:
    audio: bytes
    rate: int
    width: int
    channels: int


def recording(path: Path) -> Pcm:
    """A recording as interleaved PCM16 at its own rate and channel count
    (soundfile directly: the input does not depend on the server's code)."""
    data, rate = soundfile.read(str(path), dtype="int16", always_2d=True)
    return Pcm(np.ascontiguousarray(data).astype("<i2").tobytes(), rate, 2, data.shape[1])


def pieces(pcm: Pcm, ms: int = CHUNK_MS) -> list[bytes]:
    step = pcm.rate * pcm.width * pcm.channels * ms // 1000
    return [pcm.audio[i : i + step] for i in range(0, len(pcm.audio), step)]


def audio_of(events: Sequence[Event]) -> Pcm:
    """The PCM of the audio-chunk events; every chunk must have the format of
    the audio-start before it."""
    start: AudioStart | None = None
    out = bytearray()
    for event in events:
        if AudioStart.is_type(event.type):
            start = AudioStart.from_event(event)
        elif AudioChunk.is_type(event.type):
            chunk = AudioChunk.from_event(event)
            assert start is not None, "audio-chunk before audio-start"
            assert (chunk.rate, chunk.width, chunk.channels) == (
                start.rate,
                start.width,
                start.channels,
            ), (chunk.rate, chunk.width, chunk.channels, start)
            out += chunk.audio
    assert start is not None, [e.type for e in events]
    return Pcm(bytes(out), start.rate, start.width, start.channels)


# ------------------------------------------------------------------- reading


async def read(client: AsyncTcpClient, timeout: float = WAIT) -> Event | None:
    """The next event, or None when the server closed the connection."""
    try:
        async with asyncio.timeout(timeout):
            return await client.read_event()
    except (ConnectionError, asyncio.IncompleteReadError):
        return None


async def read_until(client: AsyncTcpClient, *final: str, timeout: float = WAIT) -> list[Event]:
    """Events up to and including the first of `final` or an `error`; the
    list ends early (without one of them) when the connection closes."""
    events: list[Event] = []
    for _ in range(MAX_EVENTS):
        event = await read(client, timeout)
        if event is None:
            return events
        events.append(event)
        if event.type in final or event.type == "error":
            return events
    raise AssertionError(f"no {final} within {MAX_EVENTS} events")


def types(events: Sequence[Event]) -> list[str]:
    return [e.type for e in events]


# ------------------------------------------- Home Assistant's event sequences


async def describe(server: Server) -> Info:
    """data.py: Describe -> the first info."""
    async with server.client() as client:
        await client.write_event(Describe().event())
        events = await read_until(client, "info")
    assert events and Info.is_type(events[-1].type), types(events)
    return Info.from_event(events[-1])


async def send_audio(client: AsyncTcpClient, pcm: Pcm, chunks: Sequence[bytes]) -> None:
    for piece in chunks:
        chunk = AudioChunk(rate=pcm.rate, width=pcm.width, channels=pcm.channels, audio=piece)
        await client.write_event(chunk.event())


async def start_transcription(client: AsyncTcpClient, pcm: Pcm, language: str = "en") -> None:
    await client.write_event(Transcribe(language=language).event())
    start = AudioStart(rate=pcm.rate, width=pcm.width, channels=pcm.channels)
    await client.write_event(start.event())


async def transcribe(server: Server, pcm: Pcm, language: str = "en") -> list[Event]:
    """stt.py: transcribe, audio-start, audio-chunks, audio-stop -> events up
    to the transcript (or an error, or the close)."""
    async with server.client() as client:
        await start_transcription(client, pcm, language)
        await send_audio(client, pcm, pieces(pcm))
        await client.write_event(AudioStop().event())
        return await read_until(client, "transcript")


def transcript_of(events: Sequence[Event]) -> str:
    """The transcript's text, after checking the sequence Home Assistant
    reads: only streaming transcript events (start, chunks) before it."""
    assert events and Transcript.is_type(events[-1].type), types(events)
    before = types(events[:-1])
    assert set(before) <= {"transcript-start", "transcript-chunk", "transcript-stop"}, before
    if "transcript-chunk" in before:
        assert before[0] == "transcript-start", before
    text = Transcript.from_event(events[-1]).text
    assert isinstance(text, str)
    return text


async def handle(
    server: Server, text: str, conversation_id: str, language: str = "en", **context: str
) -> list[Event]:
    """conversation.py: one transcript with its context -> events up to
    handled / not-handled / error (or the close)."""
    async with server.client() as client:
        ctx = {"conversation_id": conversation_id, **context}
        await client.write_event(Transcript(text, context=ctx, language=language).event())
        return await read_until(client, "handled", "not-handled")


def handled_text(events: Sequence[Event]) -> str:
    """The handled event's text, after checking the sequence: only streaming
    handled events (start, chunks, stop) before it."""
    assert events and events[-1].type == "handled", [(e.type, e.data) for e in events[-3:]]
    before = types(events[:-1])
    assert set(before) <= {"handled-start", "handled-chunk", "handled-stop"}, before
    text = events[-1].data.get("text")
    assert isinstance(text, str), events[-1].data
    return text


def voice(name: str | None) -> SynthesizeVoice | None:
    return SynthesizeVoice(name=name) if name is not None else None


async def synthesize(server: Server, text: str, voice_name: str | None = None) -> list[Event]:
    """tts.py async_get_tts_audio: synthesize -> events up to audio-stop."""
    async with server.client() as client:
        await client.write_event(Synthesize(text=text, voice=voice(voice_name)).event())
        return await read_until(client, "audio-stop")


async def synthesize_streaming(
    server: Server, parts: Sequence[str], voice_name: str | None = None
) -> list[Event]:
    """tts.py async_stream_tts_audio: the text written by its own task while
    the audio is read, up to synthesize-stopped."""
    chosen = voice(voice_name)

    async def write(client: AsyncTcpClient) -> None:
        await client.write_event(SynthesizeStart(voice=chosen).event())
        for part in parts:
            await client.write_event(SynthesizeChunk(text=part).event())
        await client.write_event(Synthesize(text="".join(parts), voice=chosen).event())
        await client.write_event(SynthesizeStop().event())

    async with server.client() as client:
        writer = asyncio.create_task(write(client))
        try:
            events = await read_until(client, "synthesize-stopped")
            await writer
        finally:
            writer.cancel()
            with contextlib.suppress(BaseException):
                await writer
    return events


# --------------------------------------------------------------------- metrics


async def metrics(server: Server) -> dict[str, float]:
    """GET /metrics, as name{labels} -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    async with aiohttp.ClientSession() as http, http.get(server.metrics_url) as resp:
        assert resp.status == 200
        text = await resp.text()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


TROUBLE = tuple(
    f"voice_agent_wyoming_{name}_total"
    for name in ("bad_events", "bad_frames", "bad_audio", "vanished")
)


async def wyoming_errors(server: Server) -> float:
    """The Wyoming side's trouble in /metrics: transport_errors_total of the
    wyoming transport (every code) plus its own bad-input and vanished-client
    counters (a test checks that this grows)."""
    m = await metrics(server)
    reported = sum(
        v
        for k, v in m.items()
        if k.startswith("voice_agent_transport_errors_total{") and 'transport="wyoming"' in k
    )
    return reported + sum(m.get(name, 0.0) for name in TROUBLE)


async def until_errors_above(server: Server, before: float, timeout: float = WAIT) -> float:
    """Poll /metrics (bounded) until the wyoming errors exceed `before`."""
    async with asyncio.timeout(timeout):
        while (now := await wyoming_errors(server)) <= before:
            await asyncio.sleep(0.1)
    return now


async def raw_read(reader: asyncio.StreamReader, timeout: float = WAIT) -> Event | None:
    """The next event on a raw connection, None when it closed."""
    try:
        async with asyncio.timeout(timeout):
            return await async_read_event(reader)
    except (ConnectionError, asyncio.IncompleteReadError):
        return None
