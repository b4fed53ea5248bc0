"""Sending audio: PCM with its format, files decoded to PCM, and streaming
it in 20 ms frames at real-time pace (or faster)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voice_agent.audio import FRAME_MS, decode, float_to_pcm16, read_wav_pcm16
from voice_agent.client.connection import EventCallback, RealtimeClient
from voice_agent.client.printing import print_event
from voice_agent.protocol import (
    ServerEvent,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)


@dataclass
class PcmAudio:
    """Interleaved PCM16 with its rate and channel count."""

    pcm: bytes
    sample_rate: int = 16000
    channels: int = 1
    frame_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.frame_bytes = 2 * self.channels * self.sample_rate * FRAME_MS // 1000

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / (2 * self.channels * self.sample_rate)

    def silence(self, seconds: float) -> bytes:
        return bytes(2 * self.channels * round(seconds * self.sample_rate))


def load_pcm(path: str | os.PathLike[str], raw: bool = False) -> PcmAudio:
    """A file as 16 kHz mono PCM16 (decoded and resampled), or with `raw` as it
    is: its own rate and channels (WAV/FLAC/OGG that soundfile reads)."""
    if raw:
        pcm, rate, channels = read_wav_pcm16(path)
        return PcmAudio(pcm, rate, channels)
    return PcmAudio(float_to_pcm16(decode(path)))


def pcm16_mono(audio: np.ndarray[Any, Any]) -> PcmAudio:
    """16 kHz mono float32 audio as PcmAudio."""
    return PcmAudio(float_to_pcm16(np.asarray(audio, dtype=np.float32)))


async def send_paced(
    client: RealtimeClient, audio: PcmAudio, pcm: bytes | None = None, speed: float = 1.0
) -> None:
    """Send `pcm` (default: audio.pcm) in 20 ms frames; real time divided by
    `speed`, or as fast as possible when speed is 0. The pace follows the
    clock, so slow sends do not make the stream drift."""
    data = audio.pcm if pcm is None else pcm
    step = audio.frame_bytes
    frame_s = FRAME_MS / 1000.0
    began = time.monotonic()
    for n, offset in enumerate(range(0, len(data), step)):
        await client.send_audio(data[offset : offset + step])
        if speed > 0:
            due = began + (n + 1) * frame_s / speed
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        elif n % 50 == 49:
            await asyncio.sleep(0)  # let the reader run


async def stream_file(
    url: str,
    path: str | os.PathLike[str],
    speed: float = 1.0,
    silence_before: float = 0.0,
    silence_after: float = 1.5,
    on_event: EventCallback | None = print_event,
    *,
    raw: bool = False,
    reply_timeout: float = 120.0,
    **session_fields: Any,
) -> list[ServerEvent]:
    """Stream one file (see module doc) and wait for its replies; every event.

    Events go to `on_event` as they arrive (default: printed on stdout; None:
    not at all). `raw` sends the file at its own rate and channels (WAV/FLAC) instead of
    16 kHz mono. An utterance still open at the end is committed.
    """
    audio = load_pcm(path, raw=raw)
    async with RealtimeClient(url, on_event=on_event) as client:
        await client.start(audio.sample_rate, audio.channels, **session_fields)
        await stream_pcm(client, audio, speed, silence_before, silence_after)
        await client.wait_settled(reply_timeout)
        return list(client.received)


async def stream_pcm(
    client: RealtimeClient,
    audio: PcmAudio,
    speed: float = 1.0,
    silence_before: float = 0.0,
    silence_after: float = 1.5,
) -> None:
    """Send silence, the audio, silence; commit an utterance left open."""
    pcm = audio.silence(silence_before) + audio.pcm + audio.silence(silence_after)
    await send_paced(client, audio, pcm, speed)
    if _open_utterance(client):
        await client.commit()


def _open_utterance(client: RealtimeClient) -> bool:
    opened: set[str] = set()
    for e in client.received:
        if isinstance(e, SpeechStartedEvent):
            opened.add(e.utterance_id)
        elif isinstance(e, SpeechStoppedEvent):
            opened.discard(e.utterance_id)
    return bool(opened)
