"""Input audio transcription (pure): the input kept to cut utterances from,
and the conversation.item.input_audio_transcription.* events.

On with `audio.input.transcription` (any model name: the server's own model
transcribes, beside the conversation, as a separate turn the history never
sees; off by default). Each committed user audio item gets one
Transcribe call; its pieces come back as `.delta` events, then `.completed`
(or `.failed`), and the item's input_audio part carries the transcript.
"""

from __future__ import annotations

from typing import Any

from voice_agent.audio import pcm16_to_float, resample
from voice_agent.engine.types import AudioArray
from voice_agent.transports.openai_realtime import events as ev
from voice_agent.transports.openai_realtime.calls import Transcribe
from voice_agent.transports.openai_realtime.items import Ids, Items

KEEP_MS = 40_000  # input kept: an utterance is at most 30 s plus its pre-roll
MAX_TOKENS = 256  # a transcript's tokens at most
SYSTEM = "You transcribe speech. You answer with the exact words spoken and nothing else."


def request(language: str | None, prompt: str | None) -> str:
    """The text of a transcription turn (with the clip: audio analysis)."""
    text = "Transcribe this audio exactly."
    if language:
        text += f" The language is {language[:32]}."
    if prompt:
        text += f" Context: {prompt[:500]}"
    return text


class Kept:
    """The Session's input (PCM16 at `rate`), the last KEEP_MS of it, by
    sample position: utterances are cut out by their start_ms/end_ms."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.fed = 0  # samples fed since the session (re)started
        self._pcm = bytearray()

    def keep(self, pcm: bytes, on: bool) -> None:
        self.fed += len(pcm) // 2
        if not on:
            self._pcm.clear()
            return
        self._pcm += pcm
        extra = len(self._pcm) - 2 * self.rate * KEEP_MS // 1000
        if extra > 0:
            del self._pcm[:extra]

    def cut(self, start_ms: int, end_ms: int) -> AudioArray | None:
        """The input from start_ms to end_ms at 16 kHz (None: not kept)."""
        first = self.fed - len(self._pcm) // 2  # sample index of _pcm[0]
        a = max(0, start_ms * self.rate // 1000 - first)
        b = max(0, end_ms * self.rate // 1000 - first)
        pcm = bytes(self._pcm[2 * a : 2 * b])
        return resample(pcm16_to_float(pcm), self.rate) if pcm else None


def calls(
    setting: dict[str, Any] | None, item_id: str, audio: AudioArray | None
) -> list[Transcribe]:
    if setting is None or audio is None or not len(audio):
        return []
    return [Transcribe(item_id, audio, setting.get("language"), setting.get("prompt"))]


def delta(ids: Ids, item_id: str, text: str) -> dict[str, Any]:
    return ids.event(
        "conversation.item.input_audio_transcription.delta",
        item_id=item_id,
        content_index=0,
        delta=text,
    )


def completed(ids: Ids, items: Items, item_id: str, text: str, seconds: float) -> dict[str, Any]:
    item = items.get(item_id)
    if item is not None:
        for part in item["content"]:
            if part.get("type") == "input_audio":
                part["transcript"] = text
    return ids.event(
        "conversation.item.input_audio_transcription.completed",
        item_id=item_id,
        content_index=0,
        transcript=text,
        usage={"type": "duration", "seconds": round(seconds, 3)},
    )


def failed(ids: Ids, item_id: str, exc: BaseException) -> dict[str, Any]:
    body = ev.error_body(exc, None)
    return ids.event(
        "conversation.item.input_audio_transcription.failed",
        item_id=item_id,
        content_index=0,
        error={k: body[k] for k in ("type", "code", "message", "param")},
    )
