"""Speaking replies: the async adapter between reply events and audio out.

`Speech` is process-wide: one TextToSpeech engine and one thread that runs it
(synthesis never blocks the event loop; sentences of all sessions take turns
on that thread, each session's in order), resampled to the rate asked for.

`ReplySpeaker` belongs to one session. The transport shows it every event it
sends (`observe`, synchronous, before the event is queued):

- reply.delta text goes through a SentenceSplitter; each completed sentence
  is synthesized as soon as it is complete, while decoding goes on;
- reply.done flushes the rest of the text; the audio ends after it;
- reply.cancelled, an error ending the reply, `stop()` (the client's cancel)
  or a newer reply.started stop the audio at once: no audio frame is handed
  to the transport after that (the task is cancelled synchronously, so
  nothing already decided can slip out), and `reply.audio.done` says
  `cancelled: true`.

Audio goes out as `reply.audio.started`, PCM16 mono frames of `frame_ms`,
then `reply.audio.done` (PROTOCOL.md, spoken replies). Bounds: sentences
waiting for synthesis are at most `max_pending`; beyond it a new sentence is
joined to the last waiting one (nothing is dropped, synthesis gets longer
pieces). One reply speaks at a time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from voice_agent.audio import float_to_pcm16, resample
from voice_agent.protocol import (
    ErrorEvent,
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
)
from voice_agent.tts import TextToSpeech
from voice_agent.tts.split import SentenceSplitter

logger = logging.getLogger("voice_agent.tts")

EventSink = Callable[[ServerEvent], Awaitable[None]]
AudioSink = Callable[[bytes], Awaitable[None]]


class Speech:
    """One engine and its thread, shared by every session of the process."""

    def __init__(self, tts: TextToSpeech) -> None:
        self.tts = tts
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tts")

    @property
    def name(self) -> str:
        return self.tts.name

    def synthesize_now(self, text: str, sample_rate: int) -> np.ndarray:
        """Blocking: float32 mono at `sample_rate` (for threads and tools)."""
        audio, rate = self.tts.synthesize(text)
        audio = np.asarray(audio)
        if audio.dtype == np.int16:
            audio = audio.astype(np.float32) / 32768.0
        return resample(audio.astype(np.float32, copy=False), rate, sample_rate)

    async def synthesize(self, text: str, sample_rate: int) -> np.ndarray:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.synthesize_now, text, sample_rate)

    def warm_up(self) -> None:
        """Synthesize a word once (loads lazily built parts before the first reply)."""
        self.synthesize_now("Ready.", 16000)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Reply:
    reply_id: str
    splitter: SentenceSplitter
    pending: deque[str] = field(default_factory=deque)
    text_done: bool = False
    cancelled: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None


class ReplySpeaker:
    """Speaks one session's replies; see the module doc."""

    def __init__(
        self,
        speech: Speech,
        sample_rate: int,
        send_event: EventSink,
        send_audio: AudioSink,
        *,
        frame_ms: int = 40,
        max_pending: int = 32,
    ) -> None:
        self.speech = speech
        self.sample_rate = sample_rate
        self._send_event = send_event
        self._send_audio = send_audio
        self.frame_bytes = 2 * sample_rate * frame_ms // 1000
        self.max_pending = max_pending
        self._reply: _Reply | None = None
        self._closed = False

    def observe(self, event: ServerEvent) -> None:
        if self._closed:
            return
        reply = self._reply
        if isinstance(event, ReplyStarted):
            self.stop()
            self._reply = reply = _Reply(event.reply_id, SentenceSplitter())
            reply.task = asyncio.create_task(self._speak(reply), name=f"speak-{event.reply_id}")
        elif reply is None or getattr(event, "reply_id", None) != reply.reply_id:
            return
        elif isinstance(event, ReplyDelta):
            self._queue(reply, reply.splitter.feed(event.text))
        elif isinstance(event, ReplyDone):
            self._queue(reply, reply.splitter.flush())
            reply.text_done = True
            reply.wake.set()
        elif isinstance(event, ReplyCancelled | ErrorEvent):
            self.stop()

    def stop(self) -> None:
        """Stop the current reply's audio now (no frame is sent after this)."""
        reply, self._reply = self._reply, None
        if reply is None or reply.cancelled:
            return
        reply.cancelled = True
        if reply.task is not None:
            reply.task.cancel()

    async def close(self) -> None:
        """Stop and wait; nothing is sent after this."""
        self._closed = True
        reply = self._reply
        self.stop()
        if reply is not None and reply.task is not None:
            await asyncio.gather(reply.task, return_exceptions=True)

    @property
    def speaking(self) -> bool:
        return self._reply is not None

    def _queue(self, reply: _Reply, sentences: list[str]) -> None:
        for sentence in sentences:
            if len(reply.pending) >= self.max_pending:
                reply.pending[-1] += " " + sentence
            else:
                reply.pending.append(sentence)
        if sentences:
            reply.wake.set()

    async def _speak(self, reply: _Reply) -> None:
        started = False
        samples = 0
        try:
            while True:
                if reply.pending:
                    text = reply.pending.popleft()
                elif reply.text_done:
                    break
                else:
                    reply.wake.clear()
                    await reply.wake.wait()
                    continue
                audio = await self.speech.synthesize(text, self.sample_rate)
                if reply.cancelled:
                    break
                if not started:
                    started = True
                    await self._send_event(ReplyAudioStarted(reply.reply_id, self.sample_rate))
                pcm = float_to_pcm16(audio)
                for i in range(0, len(pcm), self.frame_bytes):
                    if reply.cancelled:
                        break
                    frame = pcm[i : i + self.frame_bytes]
                    await self._send_audio(frame)
                    samples += len(frame) // 2
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            logger.warning(
                "speech failed: %s", type(exc).__name__, extra={"reply_id": reply.reply_id}
            )
        finally:
            if self._reply is reply:
                self._reply = None
            if started and not self._closed:
                await self._send_event(
                    ReplyAudioDone(
                        reply.reply_id, samples * 1000 // self.sample_rate, reply.cancelled
                    )
                )
