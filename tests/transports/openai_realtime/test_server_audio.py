"""Spoken responses, cancel and barge-in through the OpenAI SDK on a real
server (loopback, scripted engine, a tone TTS whose lengths are exact)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from openai import AsyncOpenAI

from tests.helpers.tts import ToneTTS
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import WebSocketServerApp, running_server
from voice_agent.tts.speaker import Speech

WAIT = 20.0
USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}


def reply(turn: TurnInput) -> str:
    if turn.text == "long":
        return "word " * 500  # five seconds at 10 ms a token
    return "One sentence here. And a second one." if turn.text else "I heard you."


@pytest.fixture
async def app() -> AsyncIterator[WebSocketServerApp]:
    config = Config(host="127.0.0.1", port=0, tts_lead_ms=0)
    speech = Speech(ToneTTS(lambda text: 0.25))
    engine = ScriptedEngine(reply, token_delay=0.01)
    async with running_server(config, engine, speech=speech) as server:
        yield server
    speech.close()


async def until(conn: Any, kind: str, seen: list[Any]) -> Any:
    async with asyncio.timeout(WAIT):
        async for event in conn:
            seen.append(event)
            if event.type == kind:
                return event
    raise AssertionError(f"connection closed before {kind}")


async def test_a_spoken_response_carries_its_audio_before_response_done(
    app: WebSocketServerApp,
) -> None:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="k")
    async with client.realtime.connect(model="qwen2-audio") as conn:
        await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
        await conn.response.create()
        seen: list[Any] = []
        done = await until(conn, "response.done", seen)
        kinds = [e.type for e in seen]
        assert done.response.status == "completed"
        assert kinds.index("response.output_audio.delta") < kinds.index(
            "response.output_audio.done"
        )
        assert kinds.index("response.output_audio.done") < kinds.index("response.done")
        pcm = b"".join(
            base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta"
        )
        samples = np.frombuffer(pcm, "<i2")
        assert len(samples) == 2 * round(0.25 * 24000)  # two sentences, 24 kHz PCM16
        assert np.abs(samples).max() > 3000  # a tone, not silence
        [transcript] = [e for e in seen if e.type == "response.output_audio_transcript.done"]
        assert transcript.transcript == "One sentence here. And a second one."


async def test_response_cancel_ends_a_spoken_response(app: WebSocketServerApp) -> None:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="k")
    async with client.realtime.connect(model="qwen2-audio") as conn:
        await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
        await conn.response.create()
        seen: list[Any] = []
        await until(conn, "response.output_audio.delta", seen)
        await conn.response.cancel()
        done = await until(conn, "response.done", seen)
        assert done.response.status == "cancelled"
        assert done.response.status_details.reason == "client_cancelled"
        # the conversation goes on
        await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
        await conn.response.create()
        assert (await until(conn, "response.done", seen)).response.status == "completed"


def voice(seconds: float) -> bytes:
    t = np.arange(round(seconds * 24000)) / 24000
    wave = np.sin(2 * np.pi * 220 * t) * 8000 * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    return wave.astype("<i2").tobytes()


async def test_barge_in_cancels_the_reply_in_flight(app: WebSocketServerApp) -> None:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="k")
    async with client.realtime.connect(model="qwen2-audio") as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {"input": {"turn_detection": {"type": "server_vad"}}},
            }
        )
        long = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "long"}],
        }
        await conn.conversation.item.create(item=long)  # type: ignore[arg-type]
        await conn.response.create()
        seen: list[Any] = []
        await until(conn, "response.output_text.delta", seen)
        audio = voice(1.0)
        for i in range(0, len(audio), 4800):
            await conn.input_audio_buffer.append(
                audio=base64.b64encode(audio[i : i + 4800]).decode()
            )
        done = await until(conn, "response.done", seen)
        assert "input_audio_buffer.speech_started" in [e.type for e in seen]
        assert done.response.status == "cancelled"
        assert done.response.status_details.reason == "turn_detected"


async def test_input_transcription_of_a_committed_turn(app: WebSocketServerApp) -> None:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="k")
    async with client.realtime.connect(model="qwen2-audio") as conn:
        await conn.session.update(
            session={
                "type": "realtime",
                "output_modalities": ["text"],
                "audio": {
                    "input": {
                        "turn_detection": None,
                        "transcription": {"model": "gpt-4o-mini-transcribe"},
                    }
                },
            }
        )
        audio = voice(0.5)
        await conn.input_audio_buffer.append(audio=base64.b64encode(audio).decode())
        await conn.input_audio_buffer.commit()
        seen: list[Any] = []
        done = await until(conn, "conversation.item.input_audio_transcription.completed", seen)
        assert done.transcript  # the scripted engine's answer to the transcription turn
        committed = next(e for e in seen if e.type == "input_audio_buffer.committed")
        assert done.item_id == committed.item_id
        await conn.conversation.item.retrieve(item_id=done.item_id)
        item = (await until(conn, "conversation.item.retrieved", seen)).item
        assert item.content[0].transcript == done.transcript


async def test_per_response_modality_and_g711_output(app: WebSocketServerApp) -> None:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="k")
    async with client.realtime.connect(model="qwen2-audio") as conn:
        await conn.session.update(
            session={"type": "realtime", "audio": {"output": {"format": {"type": "audio/pcmu"}}}}
        )
        await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
        await conn.response.create(response={"output_modalities": ["text"]})
        seen: list[Any] = []
        done = await until(conn, "response.done", seen)
        assert done.response.status == "completed"
        assert "response.output_text.delta" in [e.type for e in seen]
        assert "response.output_audio.delta" not in [e.type for e in seen]
        seen.clear()
        await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
        await conn.response.create()  # the session's modality: audio, G.711 mu-law at 8 kHz
        await until(conn, "response.done", seen)
        audio = b"".join(
            base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta"
        )
        assert len(audio) == 2 * round(0.25 * 8000)  # one byte a sample


class _SlowTTS(ToneTTS):
    """Synthesis slower than the idle timeout over a whole reply (as Piper
    on a loaded CPU): 0.6 s of work per sentence."""

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        time.sleep(0.6)
        return super().synthesize(text)


async def test_audio_still_going_out_is_not_idle() -> None:
    # The reply's text is done at once; its sentences' audio goes out over
    # about 2.4 s, more than twice the 1 s idle timeout: audio being written
    # counts as activity (before, the session was closed in the middle).
    config = Config(host="127.0.0.1", port=0, tts_lead_ms=0, idle_timeout=1.0)
    speech = Speech(_SlowTTS(lambda text: 0.25))
    engine = ScriptedEngine(lambda turn: "One. Two. Three. Four.", token_delay=0.0)
    try:
        async with running_server(config, engine, speech=speech) as app:
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{app.port}/v1", api_key="k")
            async with client.realtime.connect(model="qwen2-audio") as conn:
                await conn.session.update(
                    session={"type": "realtime", "output_modalities": ["audio"]}
                )
                await conn.conversation.item.create(item=USER)  # type: ignore[arg-type]
                await conn.response.create()
                seen: list[Any] = []
                done = await until(conn, "response.done", seen)
                assert done.response.status == "completed"
                deltas = [e for e in seen if e.type == "response.output_audio.delta"]
                assert len(deltas) >= 4
            assert app.counters["idle_closes_total"] == 0
    finally:
        speech.close()
