"""LiveKit Agents' openai.realtime.RealtimeModel (livekit-plugins-openai, a
dev dependency: it installs from PyPI) pointed at a real voice_agent server
on loopback. Its RealtimeSession runs without a LiveKit room: the test calls
generate_reply() and pushes microphone frames itself, as AgentSession would.

The tiny random Qwen2-Audio answers (noise: only the generation, its ids and
its audio are checked); the scripted engine + Piper where the audio must be
speech.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from livekit import rtc
from livekit.agents import llm
from livekit.plugins.openai.realtime import RealtimeModel
from openai.types.realtime.realtime_audio_input_turn_detection import ServerVad

from tests.e2e.openai_support import KEY, MODEL, base_url, finished, openai_server
from tests.helpers.speech import voiced_fraction
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import WebSocketServerApp
from voice_agent.tts.speaker import Speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WAIT = 90.0
REPLY = "Sure, the kitchen light is on now. Anything else I can do for you this evening?"


@asynccontextmanager
async def livekit_session(
    app: WebSocketServerApp, **options: Any
) -> AsyncIterator[tuple[Any, list[Any], list[dict[str, Any]]]]:
    """RealtimeModel(base_url=http://127.0.0.1:PORT/v1, ...) and one session
    of it; the session's error events and the raw server events it got."""
    model = RealtimeModel(model=MODEL, base_url=base_url(app), api_key=KEY, **options)
    session = model.session()
    errors: list[Any] = []
    events: list[dict[str, Any]] = []
    session.on("error", errors.append)
    session.on("openai_server_event_received", events.append)
    try:
        yield session, errors, events
    finally:
        await session.aclose()
        await model.aclose()


async def drain(generation: llm.GenerationCreatedEvent) -> tuple[list[str], str, bytes, int]:
    """Everything one generation streams: message ids, text, PCM16 and its rate."""
    ids: list[str] = []
    text: list[str] = []
    pcm: list[bytes] = []
    rates: set[int] = set()

    async def message(msg: llm.MessageGeneration) -> None:
        ids.append(msg.message_id)

        async def texts() -> None:
            async for piece in msg.text_stream:
                text.append(str(piece))

        async def audio() -> None:
            async for frame in msg.audio_stream:
                rates.add(frame.sample_rate)
                pcm.append(bytes(frame.data))

        await asyncio.gather(texts(), audio())

    async with asyncio.timeout(WAIT):
        async for msg in generation.message_stream:
            await message(msg)
    assert len(rates) <= 1, rates
    return ids, "".join(text), b"".join(pcm), rates.pop() if rates else 0


async def wait_done(events: list[dict[str, Any]], n: int = 1) -> list[dict[str, Any]]:
    async with asyncio.timeout(WAIT):
        while len(done := [e for e in events if e["type"] == "response.done"]) < n:
            await asyncio.sleep(0.05)
    return done


async def test_livekit_generate_reply_with_its_defaults(tiny_engine: Qwen2AudioEngine) -> None:
    """LiveKit's default session (semantic_vad, input transcription, voice
    "marin", audio out) is accepted; generate_reply() gets its response
    (matched by response.metadata) and the response completes."""
    async with (
        openai_server(tiny_engine) as app,
        livekit_session(app) as (session, errors, events),
    ):
        generation = await asyncio.wait_for(session.generate_reply(instructions="Say hello."), WAIT)
        assert generation.user_initiated  # response.created carried our metadata
        ids, _text, _pcm, _rate = await drain(generation)
        (done,) = await wait_done(events)
    assert not errors, errors
    assert finished(done), done["response"]
    assert done["response"]["id"] == generation.response_id
    assert len(ids) == 1 and ids[0] == done["response"]["output"][0]["id"]


async def test_livekit_text_reply(tiny_engine: Qwen2AudioEngine) -> None:
    async with (
        openai_server(tiny_engine) as app,
        livekit_session(app, modalities=["text"], input_audio_transcription=None) as (
            session,
            errors,
            events,
        ),
    ):
        chat = llm.ChatContext.empty()
        chat.add_message(role="user", content="Hello there, how are you?")
        await asyncio.wait_for(session.update_chat_ctx(chat), WAIT)
        generation = await asyncio.wait_for(session.generate_reply(), WAIT)
        _ids, text, pcm, _rate = await drain(generation)
        (done,) = await wait_done(events)
    assert not errors, errors
    assert finished(done), done["response"]
    assert pcm == b""
    deltas = [e["delta"] for e in events if e["type"] == "response.output_text.delta"]
    assert text == "".join(deltas)


async def test_livekit_hears_the_microphone_and_speaks(piper: Speech, audio_dir: Path) -> None:
    """Microphone frames of a real recording (16 kHz; LiveKit resamples to
    24 kHz), server VAD: the server ends the turn and answers with speech."""
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    data, rate = soundfile.read(str(audio_dir / "ldc93s1-16k-mono.wav"), dtype="int16")
    pcm = np.concatenate([np.zeros(8000, np.int16), data, np.zeros(32000, np.int16)])
    vad = ServerVad(
        type="server_vad", silence_duration_ms=600, create_response=True, interrupt_response=True
    )
    generations: list[llm.GenerationCreatedEvent] = []
    async with (
        openai_server(engine, speech=piper, max_new_tokens=1000) as app,
        livekit_session(
            app, modalities=["audio"], turn_detection=vad, input_audio_transcription=None
        ) as (session, errors, events),
    ):
        session.on("generation_created", generations.append)
        step = rate // 50  # 20 ms
        for i in range(0, len(pcm), step):
            chunk = pcm[i : i + step]
            session.push_audio(
                rtc.AudioFrame(
                    data=chunk.tobytes(),
                    sample_rate=rate,
                    num_channels=1,
                    samples_per_channel=len(chunk),
                )
            )
            await asyncio.sleep(0.01)  # 2x real time
        async with asyncio.timeout(WAIT):
            while not generations:
                await asyncio.sleep(0.05)
        _ids, text, spoken, out_rate = await drain(generations[0])
        (done,) = await wait_done(events)
    assert not errors, errors
    kinds = [e["type"] for e in events]
    assert "input_audio_buffer.speech_started" in kinds
    assert "input_audio_buffer.speech_stopped" in kinds
    assert done["response"]["status"] == "completed"
    assert out_rate == 24000
    assert voiced_fraction(spoken, out_rate) > 0.4
    assert text.strip() == REPLY  # the audio transcript


async def test_livekit_interrupt_and_truncate(piper: Speech) -> None:
    """What AgentSession does when the user talks over the agent: interrupt()
    (response.cancel), then truncate() the assistant message at what was
    played: the response ends cancelled, the item is truncated, no error."""
    long = " ".join(f"This is sentence number {n} of a very long answer." for n in range(60))
    engine = ScriptedEngine([long], token_delay=0.05)
    async with (
        openai_server(engine, speech=piper, max_new_tokens=1000) as app,
        livekit_session(app, modalities=["audio"], input_audio_transcription=None) as (
            session,
            errors,
            events,
        ),
    ):
        chat = llm.ChatContext.empty()
        chat.add_message(role="user", content="Talk to me.")
        await asyncio.wait_for(session.update_chat_ctx(chat), WAIT)
        generation = await asyncio.wait_for(session.generate_reply(), WAIT)
        message = await asyncio.wait_for(anext(aiter(generation.message_stream)), WAIT)
        frames: list[rtc.AudioFrame] = []

        async def listen() -> None:
            async for frame in message.audio_stream:
                frames.append(frame)

        listening = asyncio.create_task(listen())
        async with asyncio.timeout(WAIT):  # a second of the answer has come
            while sum(f.duration for f in frames) < 1.0:
                await asyncio.sleep(0.02)
        assert {f.sample_rate for f in frames} == {24000}
        session.interrupt()
        (done,) = await wait_done(events)
        session.truncate(
            message_id=message.message_id, modalities=["audio", "text"], audio_end_ms=500
        )
        async with asyncio.timeout(WAIT):
            while not [e for e in events if e["type"] == "conversation.item.truncated"]:
                await asyncio.sleep(0.05)
        await asyncio.wait_for(listening, WAIT)  # the stream ends with the response
    assert done["response"]["status"] == "cancelled"
    (truncated,) = [e for e in events if e["type"] == "conversation.item.truncated"]
    assert truncated["item_id"] == message.message_id and truncated["audio_end_ms"] == 500
    assert not errors, errors


async def test_livekit_interrupt_before_any_audio_deletes_the_reply() -> None:
    """LiveKit's truncate() at audio_end_ms 0 (the user talked over the agent
    before it was heard, or a text session) deletes the assistant item:
    conversation.item.deleted, no error."""
    long = " ".join(f"This is sentence number {n} of a very long answer." for n in range(60))
    engine = ScriptedEngine([long, "Yes."], token_delay=0.05)
    async with (
        openai_server(engine, max_new_tokens=1000) as app,
        livekit_session(app, modalities=["text"], input_audio_transcription=None) as (
            session,
            errors,
            events,
        ),
    ):
        chat = llm.ChatContext.empty()
        chat.add_message(role="user", content="Talk to me.")
        await asyncio.wait_for(session.update_chat_ctx(chat), WAIT)
        generation = await asyncio.wait_for(session.generate_reply(), WAIT)
        message = await asyncio.wait_for(anext(aiter(generation.message_stream)), WAIT)
        session.interrupt()
        await wait_done(events)
        session.truncate(
            message_id=message.message_id, modalities=["audio", "text"], audio_end_ms=0
        )
        async with asyncio.timeout(WAIT):
            while not [e for e in events if e["type"] in ("conversation.item.deleted", "error")]:
                await asyncio.sleep(0.05)
        assert not errors, errors
        (deleted,) = [e for e in events if e["type"] == "conversation.item.deleted"]
        assert deleted["item_id"] == message.message_id
        chat.add_message(role="user", content="Something else.")
        await asyncio.wait_for(session.update_chat_ctx(chat), WAIT)
        again = await asyncio.wait_for(session.generate_reply(), WAIT)
        assert again.user_initiated
        await wait_done(events, 2)
