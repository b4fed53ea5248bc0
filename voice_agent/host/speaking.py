"""Speaking replies: one sentence -> PCM pipeline, streamed or joined.

Both ways build on tts/pipeline.py's SentenceAudio (sentences synthesized in
order on the process's one speech thread while decoding goes on, one piece
ahead, at most MAX_PENDING_PIECES waiting):

- streamed (WebSocket, WebRTC): `reply_speaker(speech, rate, send_event,
  send_audio, ...)` is a tts/speaker.py ReplySpeaker: `reply.audio.started`,
  paced PCM16 frames, `reply.audio.done`, stopped at once by a cancel or a
  barge-in;
- joined (MQTT): `WavReply(speech)`: `feed(text)` as the reply is decoded,
  `finish()`, then `await wav()` gives one 16-bit mono WAV at WAV_RATE (None
  when nothing was said or speech failed, logged); `cancel()` stops it.
"""

from __future__ import annotations

import asyncio
import io
import logging

import numpy as np
import soundfile

from voice_agent.tts.pipeline import SentenceAudio
from voice_agent.tts.speaker import (
    AUDIO_LEAD_MS,
    AudioSink,
    EventSink,
    PlaybackHook,
    ReplySpeaker,
    Speech,
)

logger = logging.getLogger("voice_agent.host")

WAV_RATE = 22050  # the joined reply (MQTT's PREFIX/DEVICE/reply/audio): Piper's rate

__all__ = ["WAV_RATE", "ReplySpeaker", "SentenceAudio", "Speech", "WavReply", "reply_speaker"]


def reply_speaker(
    speech: Speech,
    sample_rate: int,
    send_event: EventSink,
    send_audio: AudioSink,
    *,
    lead_ms: int = AUDIO_LEAD_MS,
    on_playback: PlaybackHook | None = None,
) -> ReplySpeaker:
    """The streamed way: one session's speaker (tts/speaker.py)."""
    return ReplySpeaker(
        speech, sample_rate, send_event, send_audio, lead_ms=lead_ms, on_playback=on_playback
    )


def join_wav(parts: list[np.ndarray], sample_rate: int) -> bytes:
    """Float32 mono pieces as one 16-bit mono WAV file."""
    buffer = io.BytesIO()
    audio = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    soundfile.write(buffer, audio, sample_rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


class WavReply:
    """The joined way: feed the reply's text as it is decoded; `wav()` gives
    the whole reply as one WAV. Create inside the running loop."""

    def __init__(self, speech: Speech, sample_rate: int = WAV_RATE) -> None:
        self.sample_rate = sample_rate
        self._audio = SentenceAudio(speech.synthesize, sample_rate)
        self._parts: list[np.ndarray] = []
        self._collector = asyncio.create_task(self._collect(), name="wav-reply")

    def feed(self, text: str) -> None:
        self._audio.feed(text)

    def finish(self) -> None:
        self._audio.finish()

    def cancel(self) -> None:
        self._audio.cancel()
        self._collector.cancel()

    async def _collect(self) -> None:
        while (audio := await self._audio.next()) is not None:
            self._parts.append(audio)

    async def wav(self) -> bytes | None:
        """The spoken reply (see the module doc). Text that was not finished
        ends here, without its unfinished last piece."""
        if not self._audio.text_done:
            self._audio.finish(flush=False)
        try:
            await self._collector
        except asyncio.CancelledError:
            if self._collector.cancelled() and not _current_cancelling():
                return None  # cancel() was called
            self.cancel()
            raise
        except Exception as exc:
            logger.warning("speech failed: %s", type(exc).__name__)
            return None
        if not self._parts:
            return None
        return join_wav(self._parts, self.sample_rate)


def _current_cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
