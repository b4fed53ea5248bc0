"""Speaking replies: the async adapter between reply events and audio out.

`Speech` is process-wide: one TextToSpeech engine and one thread that runs it
(synthesis never blocks the event loop; sentences of all sessions take turns
on that thread, each session's in order), resampled to the rate asked for.

`ReplySpeaker` belongs to one session. The transport shows it every event it
sends (`observe`, synchronous, before the event is queued):

- reply.delta text goes through a SentenceSplitter; each completed piece is
  synthesized as soon as it is complete, while decoding goes on (the first
  piece is cut early, see split.py, since the listener waits for it); the
  next piece is synthesized while the current one is being sent;
- reply.done flushes the rest of the text; the audio ends after it;
- reply.cancelled, an error ending the reply, `stop()` (the client's cancel,
  or a barge-in while the audio plays) or a newer reply.started stop the
  audio at once: no audio frame is handed to the transport after that (the
  task is cancelled synchronously, so nothing already decided can slip out),
  and `reply.audio.done` says `cancelled: true` unless it was already sent.

Audio goes out as `reply.audio.started`, PCM16 mono frames of `frame_ms`,
then `reply.audio.done` (PROTOCOL.md, spoken replies).

Pacing: frames are handed out at real time, at most `lead_ms` (default
AUDIO_LEAD_MS, `--tts-lead-ms`) of audio ahead of the clock. The speaker
keeps a play head: the clock time at which the audio sent so far ends
playing, assuming the client plays each frame as soon as it arrives and
plays continuously (when synthesis falls behind, the head restarts at the
current time). A frame is sent once the head would end at most `lead_ms`
ahead of now, so the client's buffer, and what it must drop on a cancel, stay
under `lead_ms`, and the transport's queue holds only that much audio.
`lead_ms <= 0` sends frames as fast as they are made. Tests pass a fake
`clock` and `sleep`.

Playback: `on_playback(reply_id, True)` once the first frame went out and
`on_playback(reply_id, False)` when the head says the audio has finished
playing (after reply.audio.done), or when the audio stops early. The session
uses it to ask longer speech for a barge-in while the assistant is heard.

Bounds: pieces waiting for synthesis are at most `max_pending`; beyond it a
new piece is joined to the last waiting one (nothing is dropped, synthesis
gets longer pieces); one piece is synthesized ahead. One reply speaks at a
time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

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
from voice_agent.tts.pipeline import MAX_PENDING_PIECES, SentenceAudio

logger = logging.getLogger("voice_agent.tts")

EventSink = Callable[[ServerEvent], Awaitable[None]]
AudioSink = Callable[[bytes], Awaitable[None]]
PlaybackHook = Callable[[str, bool], Awaitable[None]]
Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Reply audio sent ahead of real time (ms): the client's buffer and the most
# it has to drop on a cancel (`--tts-lead-ms`; see the module doc).
AUDIO_LEAD_MS = 200


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
        """Synthesize a short clause once at start-up, so the first reply does
        not pay for lazily built parts (ONNX Runtime's first run, the
        phonemizer, the resampler)."""
        self.synthesize_now("Hello, I am ready.", 16000)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


@dataclass
class _Reply:
    reply_id: str
    audio: SentenceAudio  # the reply's text in, its pieces' audio out (pipeline.py)
    cancelled: bool = False
    task: asyncio.Task[None] | None = None
    started: bool = False  # reply.audio.started sent
    done_sent: bool = False  # reply.audio.done sent
    playing: bool = False  # on_playback(True) reported, False not yet
    samples: int = 0  # audio samples sent
    play_end: float = 0.0  # clock time at which the audio sent so far ends playing


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
        max_pending: int = MAX_PENDING_PIECES,
        lead_ms: int = AUDIO_LEAD_MS,
        on_playback: PlaybackHook | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.speech = speech
        self.sample_rate = sample_rate
        self._send_event = send_event
        self._send_audio = send_audio
        self.frame_bytes = 2 * sample_rate * frame_ms // 1000
        self.max_pending = max_pending
        # A frame must fit in the lead, else every frame would wait for an underrun.
        self.lead_s = max(lead_ms, frame_ms) / 1000.0 if lead_ms > 0 else None
        self._on_playback = on_playback
        self._clock = clock
        self._sleep = sleep
        self._reply: _Reply | None = None
        self._closed = False
        self.muted = False  # set_muted(True): no reply is spoken until unmuted

    def set_muted(self, muted: bool) -> None:
        """Muted: the reply speaking stops now and later replies are not
        synthesized (no CPU spent on them) until unmuted; unmuting takes effect
        from the next reply."""
        self.muted = muted
        if muted:
            self.stop()

    def observe(self, event: ServerEvent) -> None:
        if self._closed or self.muted:
            return
        reply = self._reply
        if isinstance(event, ReplyStarted):
            self.stop()
            pieces = SentenceAudio(
                self.speech.synthesize, self.sample_rate, max_pending=self.max_pending
            )
            self._reply = reply = _Reply(event.reply_id, pieces)
            reply.task = asyncio.create_task(self._speak(reply), name=f"speak-{event.reply_id}")
        elif reply is None or getattr(event, "reply_id", None) != reply.reply_id:
            return
        elif isinstance(event, ReplyDelta):
            reply.audio.feed(event.text)
        elif isinstance(event, ReplyDone):
            reply.audio.finish()
        elif isinstance(event, ReplyCancelled | ErrorEvent):
            self.stop()

    def stop(self, reply_id: str | None = None) -> None:
        """Stop the current reply's audio now (no frame is sent after this);
        with `reply_id`, only if that reply is the one speaking."""
        reply = self._reply
        if reply is None or (reply_id is not None and reply.reply_id != reply_id):
            return
        self._reply = None
        if reply.cancelled:
            return
        reply.cancelled = True
        reply.audio.cancel()
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
        """A reply is being spoken: synthesized, sent, or still playing."""
        return self._reply is not None

    @property
    def reply_id(self) -> str | None:
        return None if self._reply is None else self._reply.reply_id

    async def _speak(self, reply: _Reply) -> None:
        try:
            await self._stream(reply)
        except asyncio.CancelledError:
            pass
        except Exception as exc:
            logger.warning(
                "speech failed: %s", type(exc).__name__, extra={"reply_id": reply.reply_id}
            )
        finally:
            reply.audio.cancel()  # nothing more is synthesized for it
            if self._reply is reply:
                self._reply = None
            if reply.started and not reply.done_sent and not self._closed:
                reply.done_sent = True
                await self._send_event(self._done(reply))
            if reply.playing:
                reply.playing = False
                if self._on_playback is not None and not self._closed:
                    await self._on_playback(reply.reply_id, False)

    def _done(self, reply: _Reply) -> ReplyAudioDone:
        return ReplyAudioDone(
            reply.reply_id, reply.samples * 1000 // self.sample_rate, reply.cancelled
        )

    async def _stream(self, reply: _Reply) -> None:
        """Synthesize the pieces in order and send their frames, paced."""
        while True:
            audio = await reply.audio.next()  # the next piece is made while this one is sent
            if reply.cancelled:
                return
            if audio is None:
                break
            if not reply.started:
                reply.started = True
                reply.play_end = self._clock()
                await self._send_event(ReplyAudioStarted(reply.reply_id, self.sample_rate))
            pcm = float_to_pcm16(audio)
            for i in range(0, len(pcm), self.frame_bytes):
                frame = pcm[i : i + self.frame_bytes]
                end = await self._pace(reply, len(frame) // 2)
                if reply.cancelled:
                    return
                await self._send_audio(frame)
                reply.samples += len(frame) // 2
                reply.play_end = end
                if not reply.playing:  # reported after the first frame: never delays it
                    reply.playing = True
                    if self._on_playback is not None:
                        await self._on_playback(reply.reply_id, True)
                reply.audio.prefetch()  # text that came meanwhile
        reply.done_sent = True
        await self._send_event(self._done(reply))
        # Still heard until the play head ends (what a barge-in rule looks at).
        left = reply.play_end - self._clock()
        if left > 0:
            await self._sleep(left)

    async def _pace(self, reply: _Reply, samples: int) -> float:
        """Wait until a frame of `samples` may go out; where the head then ends."""
        duration = samples / self.sample_rate
        while True:
            now = self._clock()
            end = max(now, reply.play_end) + duration
            if self.lead_s is None or end - now <= self.lead_s + 1e-9:
                return end
            await self._sleep(end - now - self.lead_s)
