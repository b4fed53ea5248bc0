"""The Wyoming paths on the real Qwen2-Audio classes (the tiny random model):
a real recording at 44.1 kHz stereo transcribed (the reply is noise, the path
is real: encoder, prompt with the instruction, batching, release), and a
handled turn on conversation wyoming:ID whose history the transcription
never touched."""

from __future__ import annotations

import asyncio
from pathlib import Path

from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.client import AsyncTcpClient

from tests.helpers.paths import AUDIO_DIR
from tests.transports.wyoming.support import read_until
from voice_agent.audio import read_wav_pcm16
from voice_agent.config import Config
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.server import running


async def test_transcribe_and_handle_on_the_tiny_model(tiny_model_dir: Path) -> None:
    engine = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=6)
    pcm, rate, channels = read_wav_pcm16(AUDIO_DIR / "ldc93s1-44k-stereo.wav")
    config = Config(host="127.0.0.1", port=0, db="none", tts="none", wyoming="tcp://127.0.0.1:0")
    async with running(config, engine) as services:
        assert services.wyoming is not None
        port = services.wyoming.port
        async with (
            AsyncTcpClient("127.0.0.1", port) as stt,
            AsyncTcpClient("127.0.0.1", port) as chat,
        ):
            await stt.write_event(Transcribe(language="en").event())
            await stt.write_event(AudioStart(rate=rate, width=2, channels=channels).event())
            step = rate * channels * 2 // 10  # 100 ms
            for i in range(0, len(pcm), step):
                chunk = AudioChunk(rate=rate, width=2, channels=channels, audio=pcm[i : i + step])
                await stt.write_event(chunk.event())
            await stt.write_event(AudioStop().event())
            context = {"conversation_id": "tiny"}
            await chat.write_event(Transcript("Hello there", context=context).event())
            transcribed, handled = await asyncio.gather(
                read_until(stt, "transcript"), read_until(chat, "handled", "not-handled")
            )
        assert isinstance(Transcript.from_event(transcribed[-1]).text, str)
        assert handled[-1].type == "handled"
        host = services.host
        assert host is not None
        kept = host.conversations.kept["wyoming:tiny"]
        history = engine.history_text(kept.conversation)
        assert "Hello there" in history and "Transcribe" not in history
