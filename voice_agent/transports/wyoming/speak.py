"""Text to speech on the Wyoming wire: the host's sentence pipeline
(tts/pipeline.py SentenceAudio on the process's one speech thread) streamed
as audio-start, audio-chunk..., audio-stop, each sentence sent as soon as it
is synthesized.

    Synthesis(speech, write)   .feed(text) (any time), .finish(), await .done(),
                               .cancel(); `write` sends one event

One audio-start (RATE Hz, 16-bit mono) before the first audio, chunks of
CHUNK_SAMPLES, one audio-stop at the end (also when nothing was said: then
audio-start and audio-stop alone). The streaming form (synthesize-start /
-chunk / -stop) feeds the chunks' text as it arrives, so the first sentence is
spoken while the rest is still being written; handler.py then adds
synthesize-stopped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.event import Event

from voice_agent.audio import float_to_pcm16
from voice_agent.host import WAV_RATE, SentenceAudio
from voice_agent.tts.speaker import Speech

RATE = WAV_RATE  # Piper's own rate: no resampling for the usual voice
WIDTH = 2
CHANNELS = 1
CHUNK_SAMPLES = 1024  # what wyoming-piper sends

Write = Callable[[Event], Awaitable[None]]


def chunks(pcm: bytes, samples: int = CHUNK_SAMPLES) -> list[Event]:
    """PCM16 mono at RATE as audio-chunk events of at most `samples` samples."""
    step = samples * WIDTH
    return [
        AudioChunk(rate=RATE, width=WIDTH, channels=CHANNELS, audio=pcm[i : i + step]).event()
        for i in range(0, len(pcm), step)
    ]


class Synthesis:
    """One synthesize request's audio (see the module doc). Create inside the loop."""

    def __init__(self, speech: Speech, write: Write) -> None:
        self._audio = SentenceAudio(speech.synthesize, RATE)
        self._write = write
        self.samples = 0
        self._started = False
        self._task = asyncio.ensure_future(self._pump())
        self._task.add_done_callback(_retrieve)  # a cancelled request's failure is not news

    def feed(self, text: str) -> None:
        self._audio.feed(text)

    def finish(self) -> None:
        self._audio.finish()

    def cancel(self) -> None:
        self._audio.cancel()
        self._task.cancel()

    async def done(self) -> None:
        """Until every piece was sent and audio-stop written; what the pump
        raised (speech failed, the client went away) is raised here."""
        await self._task

    async def _start(self) -> None:
        if not self._started:
            self._started = True
            await self._write(AudioStart(rate=RATE, width=WIDTH, channels=CHANNELS).event())

    async def _pump(self) -> None:
        while (audio := await self._audio.next()) is not None:
            pcm = float_to_pcm16(audio)
            if not pcm:
                continue
            await self._start()
            for event in chunks(pcm):
                await self._write(event)
            self.samples += len(pcm) // WIDTH
        if self._audio.cancelled:
            return
        await self._start()
        await self._write(AudioStop().event())


def _retrieve(task: asyncio.Future[None]) -> None:
    if not task.cancelled():
        task.exception()
