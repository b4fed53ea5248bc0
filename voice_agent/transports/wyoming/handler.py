"""One Wyoming connection: events in, host calls out, events back.

Events served (everything else is answered with an `error`, code
bad_message, and the connection lives on; `select-program` is accepted in
silence: one program per service):

    describe                              -> info (info.py)
    ping                                  -> pong
    transcribe (language)? audio-start audio-chunk... audio-stop
                                          -> transcript-start, transcript-chunk...,
                                             transcript, transcript-stop (asr.py)
    transcript (text, context)            -> handled | not-handled (converse.py)
    synthesize (text, voice)              -> audio-start, audio-chunk..., audio-stop
    synthesize-start synthesize-chunk... synthesize-stop
                                          -> the same audio while the text comes,
                                             then synthesize-stopped (speak.py);
                                             a `synthesize` inside it is Home
                                             Assistant's copy for older servers:
                                             ignored

The requested voice is not an error whatever its name: the server has one
voice (info.py), and every request is spoken with it.

Errors go through host.report(exc, transport="wyoming") (counted, logged,
mapped by errors.py) and out as an `error` event {text, code}. An audio-chunk
or audio-stop with no audio-start, an unsupported format, a partial frame or
too much audio (audio_in.py) is an error and ends that audio stream. A
malformed or oversized event (framing.py), a failed transcription or
synthesis, or an admission refusal is an error and then the connection
closes (Home Assistant waits for the answer otherwise). A client that
vanishes, or stops reading for WRITE_TIMEOUT seconds, is counted
(stats.vanished) and its work cancelled; no connection ever touches
another's state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from wyoming.asr import Transcript, TranscriptChunk, TranscriptStart, TranscriptStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Info
from wyoming.ping import Pong

from voice_agent.audio import duration_ms
from voice_agent.errors import (
    BadMessage,
    ModelLoading,
    ShuttingDown,
    Unsupported,
    VoiceAgentError,
)
from voice_agent.host import ConversationHost

from .asr import transcribe
from .audio_in import AudioIn, audio_format
from .converse import TRANSPORT, converse
from .framing import LIMITS, FrameError, Limits, Vanished, read_event, write_event
from .speak import Synthesis
from .stats import WyomingStats

logger = logging.getLogger("voice_agent.wyoming")

MAX_SYNTH_CHARS = 10_000  # text of one synthesize request (streamed: all chunks)
WRITE_TIMEOUT = 30.0  # seconds a client may leave an event unread before it is dropped


class Closing(Exception):
    """The connection ends after the error just sent."""


class Connection:
    """See the module doc. `run()` serves until the client leaves."""

    def __init__(
        self,
        host: ConversationHost,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        info: Callable[[], Info],
        stats: WyomingStats,
        limits: Limits = LIMITS,
        idle_timeout: float = 0.0,
        max_audio_ms: int = 30_000,
    ) -> None:
        self.host = host
        self.reader = reader
        self.writer = writer
        self.info = info
        self.stats = stats
        self.limits = limits
        self.idle_timeout = idle_timeout
        self.max_audio_ms = max_audio_ms
        self.language: str | None = None
        self.audio: AudioIn | None = None
        self.synthesis: Synthesis | None = None
        self.synth_chars = 0
        self._write_lock = asyncio.Lock()

    # -- the loop ------------------------------------------------------------

    async def run(self) -> None:
        try:
            while True:
                try:
                    event = await self._next()
                except FrameError as exc:
                    self.stats.bad_frames += 1
                    await self._error(exc, close=True)
                if event is None:
                    return
                self.stats.events += 1
                try:
                    await self._dispatch(event)
                except VoiceAgentError as exc:
                    await self._error(exc)
                except (KeyError, TypeError, ValueError, AttributeError):
                    self.stats.bad_events += 1
                    await self._error(BadMessage(f"malformed {event.type[:64]} event"))
        except Closing:
            return
        except (Vanished, ConnectionError):
            self.stats.vanished += 1
        finally:
            if self.synthesis is not None:
                self.synthesis.cancel()

    async def _next(self) -> Event | None:
        if self.idle_timeout > 0 and self.synthesis is None:
            try:
                return await asyncio.wait_for(
                    read_event(self.reader, self.limits), self.idle_timeout
                )
            except TimeoutError:
                self.stats.idle_closed += 1
                return None
        return await read_event(self.reader, self.limits)

    async def write(self, event: Event) -> None:
        """One event out; Vanished when the client has not taken it within
        WRITE_TIMEOUT seconds (it stopped reading: the connection ends)."""
        async with self._write_lock:
            try:
                await asyncio.wait_for(write_event(event, self.writer), WRITE_TIMEOUT)
            except TimeoutError:
                raise Vanished("the client stopped reading") from None

    async def _error(self, exc: BaseException, *, close: bool = False) -> None:
        wire = self.host.report(exc, transport=TRANSPORT)
        self.stats.errors += 1
        await self.write(Error(text=wire.message, code=wire.code).event())
        if close or wire.close_code is not None:
            raise Closing

    def _ready(self) -> None:
        """A request needs the engine: ShuttingDown or ModelLoading (the
        connection itself was admitted when it opened)."""
        if self.host.admission.shutting_down:
            raise ShuttingDown()
        if self.host.admission.loading:
            raise ModelLoading()

    # -- events ----------------------------------------------------------------

    async def _dispatch(self, event: Event) -> None:
        kind, data = event.type, event.data
        if kind == "describe":
            await self.write(self.info().event())
        elif kind == "ping":
            await self.write(Pong(text=data.get("text")).event())
        elif kind == "select-program":
            return
        elif kind == "transcribe":
            language = data.get("language")
            self.language = language[:32] if isinstance(language, str) else None
        elif kind == "audio-start":
            await self._audio_start(data)
        elif kind == "audio-chunk":
            await self._audio_chunk(data, event.payload or b"")
        elif kind == "audio-stop":
            await self._audio_stop()
        elif kind == "transcript":
            self._ready()
            answer = await converse(self.host, data)
            if answer.type == "handled":
                self.stats.handled += 1
            else:
                self.stats.not_handled += 1
            await self.write(answer)
        elif kind in ("synthesize", "synthesize-start", "synthesize-chunk", "synthesize-stop"):
            await self._synthesize(kind, data)
        else:
            self.stats.bad_events += 1
            await self._error(BadMessage(f"unknown event type {kind[:64]!r}"))

    async def _audio_start(self, data: dict[str, Any]) -> None:
        self.audio = None
        try:
            fmt = audio_format(data.get("rate"), data.get("width"), data.get("channels"))
        except VoiceAgentError as exc:
            self.stats.bad_audio += 1
            await self._error(exc)
            return
        self.audio = AudioIn(fmt, self.max_audio_ms)

    async def _audio_chunk(self, data: dict[str, Any], payload: bytes) -> None:
        if self.audio is None:
            self.stats.bad_audio += 1
            await self._error(BadMessage("audio-chunk before audio-start"))
            return
        try:
            fmt = audio_format(data.get("rate"), data.get("width"), data.get("channels"))
            self.audio.add(payload, fmt)
        except VoiceAgentError as exc:
            self.audio = None
            self.stats.bad_audio += 1
            await self._error(exc)

    async def _audio_stop(self) -> None:
        stream, self.audio = self.audio, None
        if stream is None:
            self.stats.bad_audio += 1
            await self._error(BadMessage("audio-stop before audio-start"))
            return
        try:
            self._ready()
            clip = await asyncio.to_thread(stream.finish)
            await self.write(TranscriptStart(language=self.language).event())
            pieces: list[str] = []
            async for piece in transcribe(self.host.engine, clip, self.language):
                pieces.append(piece)
                await self.write(TranscriptChunk(text=piece).event())
        except VoiceAgentError as exc:
            await self._error(exc, close=True)
            return
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:  # the engine failed: reported with its traceback
            await self._error(exc, close=True)
            return
        self.stats.transcripts += 1
        text = "".join(pieces).strip()
        logger.info(
            "wyoming transcribed",
            extra={"audio_ms": duration_ms(clip), "chars": len(text)},
        )
        await self.write(Transcript(text=text, language=self.language).event())
        await self.write(TranscriptStop().event())

    async def _synthesize(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "synthesize" and self.synthesis is not None:
            return  # Home Assistant's copy of a streamed request for older servers
        text = data.get("text")
        if kind in ("synthesize", "synthesize-chunk") and not isinstance(text, str):
            self.stats.bad_events += 1
            await self._error(BadMessage(f"{kind} needs a text"))
            return
        if kind in ("synthesize", "synthesize-start"):
            speech = self.host.speech
            if speech is None:
                await self._error(Unsupported("this server does not speak (--tts none)"))
                return
            if self.synthesis is not None:
                await self._error(BadMessage(f"{kind} while a synthesis runs"))
                return
            self.synthesis = Synthesis(speech, self.write)
            self.synth_chars = 0
        if self.synthesis is None:
            await self._error(BadMessage(f"{kind} before synthesize-start"))
            return
        if isinstance(text, str) and kind in ("synthesize", "synthesize-chunk"):
            self.synth_chars += len(text)
            if self.synth_chars > MAX_SYNTH_CHARS:
                self.synthesis.cancel()
                self.synthesis = None
                await self._error(BadMessage(f"text longer than {MAX_SYNTH_CHARS} characters"))
                return
            self.synthesis.feed(text)
        if kind in ("synthesize", "synthesize-stop"):
            synthesis, self.synthesis = self.synthesis, None
            synthesis.finish()
            try:
                await synthesis.done()
            except (asyncio.CancelledError, ConnectionError):
                raise
            except Exception as exc:
                await self._error(exc, close=True)
                return
            self.stats.synthesized += 1
            logger.info(
                "wyoming synthesized",
                extra={"chars": self.synth_chars, "samples": synthesis.samples},
            )
            if kind == "synthesize-stop":
                await self.write(Event(type="synthesize-stopped"))
