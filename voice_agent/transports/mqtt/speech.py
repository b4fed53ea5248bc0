"""A spoken MQTT reply: sentences synthesized in order while decoding goes on,
joined into one WAV file for PREFIX/DEVICE/reply/audio."""

from __future__ import annotations

import asyncio
import io
import logging

import numpy as np
import soundfile

from voice_agent.tts.speaker import Speech
from voice_agent.tts.split import SentenceSplitter

logger = logging.getLogger("voice_agent.mqtt")

WAV_RATE = 22050  # PREFIX/DEVICE/reply/audio: the rate of Piper's voices


class SpokenReply:
    """Feed the reply's text as it is decoded; `wav()` gives the whole WAV."""

    def __init__(self, speech: Speech) -> None:
        self.speech = speech
        self._splitter = SentenceSplitter()
        self._parts: list[asyncio.Future[np.ndarray]] = []

    def feed(self, text: str) -> None:
        self._parts += [self._say(s) for s in self._splitter.feed(text)]

    def finish(self) -> None:
        self._parts += [self._say(s) for s in self._splitter.flush()]

    def cancel(self) -> None:
        for future in self._parts:
            future.cancel()

    def _say(self, sentence: str) -> asyncio.Future[np.ndarray]:
        return asyncio.ensure_future(self.speech.synthesize(sentence, WAV_RATE))

    async def wav(self) -> bytes | None:
        """The spoken reply as a 16-bit mono WAV; None when nothing was said or
        speech failed (logged)."""
        if not self._parts:
            return None
        try:
            parts = await asyncio.gather(*self._parts)
        except asyncio.CancelledError:
            self.cancel()
            raise
        except Exception as exc:
            logger.warning("speech failed: %s", type(exc).__name__)
            return None
        buffer = io.BytesIO()
        soundfile.write(buffer, np.concatenate(parts), WAV_RATE, format="WAV", subtype="PCM_16")
        return buffer.getvalue()
