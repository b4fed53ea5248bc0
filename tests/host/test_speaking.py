"""Speaking: the one sentence -> PCM pipeline, joined into one WAV for MQTT."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import soundfile

from tests.helpers.tts import ToneTTS
from voice_agent.host.speaking import SentenceAudio, WavReply
from voice_agent.tts.speaker import Speech


def ten_ms_a_character(text: str) -> float:
    return 0.01 * len(text)


async def test_a_reply_joined_into_one_wav_in_order() -> None:
    tts = ToneTTS(ten_ms_a_character)
    speech = Speech(tts)
    reply = WavReply(speech, 16000)
    for delta in ("Hello there. ", "How are ", "you today? Fine."):
        reply.feed(delta)
    reply.finish()
    wav = await reply.wav()
    assert wav is not None
    audio, rate = soundfile.read(io.BytesIO(wav))
    assert rate == 16000
    assert tts.said == ["Hello there.", "How are you today?", "Fine."]
    assert len(audio) == 160 * sum(len(s) for s in tts.said)
    speech.close()


async def test_nothing_said_or_cancelled_gives_no_wav() -> None:
    speech = Speech(ToneTTS(ten_ms_a_character))
    silent = WavReply(speech)
    silent.finish()
    assert await silent.wav() is None
    cancelled = WavReply(speech)
    cancelled.feed("Something to say. ")
    cancelled.cancel()
    assert await cancelled.wav() is None
    speech.close()


async def test_waiting_pieces_are_bounded_by_joining() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    said: list[str] = []

    async def synthesize(text: str, rate: int) -> np.ndarray:
        said.append(text)
        started.set()
        await release.wait()
        return np.zeros(1, dtype=np.float32)

    pipeline = SentenceAudio(synthesize, 16000, max_pending=2)
    pipeline.feed("One. ")
    pipeline.feed("Two. Three. Four. Five. ")
    first = asyncio.create_task(pipeline.next())
    await started.wait()
    assert len(pipeline.pending) <= 2  # the rest was joined onto the last piece
    pipeline.finish()
    release.set()
    pieces = [await first]
    while (audio := await pipeline.next()) is not None:
        pieces.append(audio)
    assert " ".join(said).replace("  ", " ").split() == ["One.", "Two.", "Three.", "Four.", "Five."]
    assert len(said) <= 3
