"""Spoken replies over WebSocket: a real server on loopback, the scripted
engine, real espeak-ng / Piper, and a raw websockets client that keeps the
order of text events and binary audio frames."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import soundfile
from websockets.asyncio.client import ClientConnection, connect

from tests.helpers.speech import voiced_fraction
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import WebSocketServerApp, running_server
from voice_agent.tts import load_tts
from voice_agent.tts.espeak import EspeakTTS
from voice_agent.tts.speaker import Speech

pytestmark = pytest.mark.timeout(60)

REPLY = (
    "Sure, the kitchen light is on now. The living room stays dark as you asked. "
    "Anything else I can do for you this evening?"
)
LONG = " ".join(f"This is sentence number {n} of a very long answer." for n in range(60))

Message = dict[str, Any] | bytes


@pytest.fixture
def config() -> Config:
    return Config(host="127.0.0.1", port=0, ping_interval=5.0, db="none")


@pytest.fixture
async def speech() -> AsyncIterator[Speech]:
    s = Speech(EspeakTTS())
    yield s
    s.close()


async def start(ws: ClientConnection, **fields: Any) -> None:
    await ws.send(json.dumps({"type": "session.start", **fields}))
    assert json.loads(await ws.recv())["type"] == "session.started"


async def collect(ws: ClientConnection, until: str, timeout: float = 30.0) -> list[Message]:
    """Every message, text decoded, up to and including the event `until`."""
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        while True:
            raw = await ws.recv()
            msg: Message = raw if isinstance(raw, bytes) else json.loads(raw)
            out.append(msg)
            if isinstance(msg, dict) and msg["type"] == until:
                return out


async def quiet(ws: ClientConnection, seconds: float) -> list[Message]:
    """What arrives within `seconds` (expected: nothing)."""
    out: list[Message] = []
    try:
        async with asyncio.timeout(seconds):
            while True:
                raw = await ws.recv()
                out.append(raw if isinstance(raw, bytes) else json.loads(raw))
    except TimeoutError:
        return out


async def until_audio(ws: ClientConnection, timeout: float = 30.0) -> list[Message]:
    """Every message up to and including the first audio frame."""
    out: list[Message] = []
    async with asyncio.timeout(timeout):
        while not any(isinstance(m, bytes) for m in out):
            raw = await ws.recv()
            out.append(raw if isinstance(raw, bytes) else json.loads(raw))
    return out


def index(messages: list[Message], kind: str) -> int:
    return next(i for i, m in enumerate(messages) if isinstance(m, dict) and m["type"] == kind)


def audio_of(messages: list[Message]) -> bytes:
    return b"".join(m for m in messages if isinstance(m, bytes))


async def spoken_reply(app: WebSocketServerApp, **start_fields: Any) -> list[Message]:
    async with connect(app.url) as ws:
        await start(ws, **start_fields)
        await ws.send(json.dumps({"type": "text", "text": "lights please"}))
        return await collect(ws, "reply.audio.done")


async def test_audio_streams_while_the_text_is_decoded(config: Config, speech: Speech) -> None:
    engine = ScriptedEngine([REPLY], token_delay=0.08)  # about 2 s of decoding
    async with running_server(config, engine, speech=speech) as app:
        messages = await spoken_reply(app)
    started, done = index(messages, "reply.audio.started"), index(messages, "reply.done")
    first_frame = next(i for i, m in enumerate(messages) if isinstance(m, bytes))
    last_frame = max(i for i, m in enumerate(messages) if isinstance(m, bytes))
    # the first sentence is heard before the reply's text is complete
    assert started < first_frame < done
    assert last_frame < len(messages) - 1  # reply.audio.done comes last
    audio_started, audio_done = messages[started], messages[-1]
    assert isinstance(audio_started, dict) and isinstance(audio_done, dict)
    assert audio_started == {"type": "reply.audio.started", "reply_id": "r1", "sample_rate": 16000}
    assert audio_done["reply_id"] == "r1" and audio_done["cancelled"] is False
    pcm = audio_of(messages)
    assert abs(audio_done["duration_ms"] - len(pcm) // 2 * 1000 // 16000) <= 1
    assert audio_done["duration_ms"] > 3000  # three sentences, all spoken
    assert voiced_fraction(pcm, 16000) > 0.4


async def test_output_sample_rate_and_piper(config: Config) -> None:
    tts = load_tts("piper")
    assert tts is not None
    speech = Speech(tts)
    try:
        engine = ScriptedEngine([REPLY], token_delay=0.01)
        async with running_server(config, engine, speech=speech) as app:
            messages = await spoken_reply(app, output_sample_rate=24000)
    finally:
        speech.close()
    started, done = messages[index(messages, "reply.audio.started")], messages[-1]
    assert isinstance(started, dict) and isinstance(done, dict)
    assert started["sample_rate"] == 24000
    pcm = audio_of(messages)
    assert abs(done["duration_ms"] - len(pcm) // 2 * 1000 // 24000) <= 1
    assert voiced_fraction(pcm, 24000) > 0.4


async def test_speak_false_gets_text_only(config: Config, speech: Speech) -> None:
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    async with running_server(config, engine, speech=speech) as app, connect(app.url) as ws:
        await start(ws, speak=False)
        await ws.send(json.dumps({"type": "text", "text": "lights please"}))
        messages = await collect(ws, "reply.done")
        messages += await quiet(ws, 2.0)
    assert not [m for m in messages if isinstance(m, bytes)]
    assert not [m for m in messages if isinstance(m, dict) and m["type"].startswith("reply.audio")]


async def test_no_speech_without_tts(config: Config) -> None:
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    async with running_server(config, engine) as app, connect(app.url) as ws:
        await start(ws)
        await ws.send(json.dumps({"type": "text", "text": "lights please"}))
        messages = await collect(ws, "reply.done") + await quiet(ws, 1.0)
    assert not [m for m in messages if isinstance(m, bytes)]


async def test_cancel_stops_the_audio(config: Config, speech: Speech) -> None:
    engine = ScriptedEngine([LONG], token_delay=0.05)  # about 35 s if not stopped
    async with running_server(config, engine, speech=speech) as app, connect(app.url) as ws:
        await start(ws)
        await ws.send(json.dumps({"type": "text", "text": "talk"}))
        before = await until_audio(ws)
        await ws.send(json.dumps({"type": "cancel"}))
        after = await collect(ws, "reply.audio.done")
        late = await quiet(ws, 2.0)
    cancelled = index(after, "reply.cancelled")
    # frames already in flight may precede reply.cancelled; none may follow it
    assert not [m for m in after[cancelled:] if isinstance(m, bytes)]
    assert not [m for m in late if isinstance(m, bytes)]
    done = after[-1]
    assert isinstance(done, dict) and done["cancelled"] is True
    spoken = len(audio_of(before + after)) // 2 * 1000 // 16000
    assert abs(done["duration_ms"] - spoken) <= 1
    assert spoken < 30000  # the long answer was not spoken to its end


async def test_a_new_reply_stops_the_old_ones_audio(config: Config, speech: Speech) -> None:
    engine = ScriptedEngine(["Short answer one. " * 8, "Second answer here."], token_delay=0.001)
    async with running_server(config, engine, speech=speech) as app, connect(app.url) as ws:
        await start(ws)
        await ws.send(json.dumps({"type": "text", "text": "one"}))
        first = await collect(ws, "reply.audio.started")
        await ws.send(json.dumps({"type": "text", "text": "two"}))
        rest = await collect(ws, "reply.done")
        rest += await collect(ws, "reply.audio.done")
        if not (isinstance(rest[-1], dict) and rest[-1]["reply_id"] == "r2"):
            rest += await collect(ws, "reply.audio.done")
    messages = first + rest
    audio_events = [
        (m["type"], m["reply_id"])
        for m in messages
        if isinstance(m, dict) and m["type"].startswith("reply.audio")
    ]
    # one reply speaks at a time: the first one's audio ends before the second's starts
    assert audio_events == [
        ("reply.audio.started", "r1"),
        ("reply.audio.done", "r1"),
        ("reply.audio.started", "r2"),
        ("reply.audio.done", "r2"),
    ]


async def test_speech_over_a_finished_reply_stops_its_audio(
    config: Config, speech: Speech, audio_dir: Path
) -> None:
    """The text is done but the audio still plays (paced): speech longer than
    barge_in_speaking_ms stops it (reply.audio.done cancelled, no
    reply.cancelled), and the utterance is answered."""
    engine = ScriptedEngine([LONG, "Yes."], token_delay=0.0005)
    pcm = speech_pcm(audio_dir / "ldc93s1-16k-mono.wav")
    async with running_server(config, engine, speech=speech) as app, connect(app.url) as ws:
        await start(ws)
        await ws.send(json.dumps({"type": "text", "text": "talk"}))
        before = await collect(ws, "reply.done")  # the text is done ...
        assert index(before, "reply.audio.started") >= 0  # ... and its audio plays
        frame = 640  # 20 ms
        for i in range(0, len(pcm), frame):
            await ws.send(pcm[i : i + frame])
        after = await collect(ws, "reply.started")
        barge_ins = app.metrics.barge_ins_total  # counted although no reply.cancelled
    types = [m["type"] for m in after if isinstance(m, dict)]
    assert "reply.cancelled" not in types
    done = after[index(after, "reply.audio.done")]
    assert isinstance(done, dict) and done["reply_id"] == "r1" and done["cancelled"] is True
    assert types.index("reply.audio.done") < types.index("speech.stopped")  # while talking
    started = after[-1]
    assert isinstance(started, dict) and started["reply_id"] == "r2"
    spoken = len(audio_of(before + after)) // 2 * 1000 // 16000
    assert spoken < 20000  # LONG (over a minute) was cut short
    assert barge_ins == 1


def speech_pcm(path: Path) -> bytes:
    """A recording as 16 kHz mono PCM16, with silence around it."""
    data, rate = soundfile.read(str(path), dtype="int16")
    assert rate == 16000 and data.ndim == 1
    gap = bytes(2 * 16000)
    return gap + data.astype("<i2").tobytes() + gap


async def test_session_update_mutes_and_unmutes_mid_session(config: Config, speech: Speech) -> None:
    """speak:false stops the reply being spoken at once (no frame after
    reply.audio.done) and keeps later replies silent; speak:true brings the
    audio back from the next reply. The text never stops."""
    engine = ScriptedEngine([LONG, REPLY, REPLY], token_delay=0.02)
    async with running_server(config, engine, speech=speech) as app, connect(app.url) as ws:
        await start(ws)
        await ws.send(json.dumps({"type": "text", "text": "talk"}))
        await until_audio(ws)
        await ws.send(json.dumps({"type": "session.update", "speak": False}))
        muted = await collect(ws, "reply.audio.done")
        done = muted[-1]
        assert isinstance(done, dict) and done["cancelled"] is True
        rest = await collect(ws, "reply.done", timeout=60)  # the text goes on to its end
        assert not [m for m in rest if isinstance(m, bytes)]

        await ws.send(json.dumps({"type": "text", "text": "and now?"}))
        second = await collect(ws, "reply.done") + await quiet(ws, 1.5)
        assert not [m for m in second if isinstance(m, bytes)]
        events = [m["type"] for m in second if isinstance(m, dict)]
        assert not [t for t in events if t.startswith("reply.audio")]

        await ws.send(json.dumps({"type": "session.update", "speak": True}))
        await ws.send(json.dumps({"type": "text", "text": "and again?"}))
        third = await collect(ws, "reply.audio.done")
    assert voiced_fraction(audio_of(third), 16000) > 0.4


async def test_session_update_turns_speech_on_in_a_session_started_without(
    config: Config, speech: Speech
) -> None:
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    async with running_server(config, engine, speech=speech) as app, connect(app.url) as ws:
        await start(ws, speak=False, output_sample_rate=24000)
        await ws.send(json.dumps({"type": "session.update", "speak": True}))
        await ws.send(json.dumps({"type": "text", "text": "lights please"}))
        messages = await collect(ws, "reply.audio.done")
    started = messages[index(messages, "reply.audio.started")]
    assert isinstance(started, dict) and started["sample_rate"] == 24000  # the start's rate
    assert voiced_fraction(audio_of(messages), 24000) > 0.4


async def test_session_update_is_ignored_by_a_server_that_does_not_speak(config: Config) -> None:
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    async with running_server(config, engine) as app, connect(app.url) as ws:
        await start(ws)
        await ws.send(json.dumps({"type": "session.update", "speak": True}))
        await ws.send(json.dumps({"type": "text", "text": "lights please"}))
        messages = await collect(ws, "reply.done") + await quiet(ws, 1.0)
    assert not [m for m in messages if isinstance(m, bytes)]
    assert not [m for m in messages if isinstance(m, dict) and m["type"] == "error"]
