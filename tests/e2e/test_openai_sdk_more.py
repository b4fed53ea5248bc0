"""More of the GA protocol through the official `openai` SDK against a real
voice_agent server on loopback: G.711 (telephony bridges send audio/pcmu),
semantic_vad, response options (instructions, metadata, max_output_tokens),
the conversation's items (retrieve, delete, duplicate ids), the input buffer
(clear, odd byte counts), one response at a time, rate_limits.updated.

The tiny random Qwen2-Audio where the reply's content does not matter; the
scripted engine + Piper where it must be long or speakable.
"""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from tests.e2e.openai_support import (
    KEY,
    MODEL,
    append_audio,
    base_url,
    check_response,
    finished,
    openai_server,
    pcm24,
    realtime,
    respond,
    say,
    silence,
    update_session,
)
from tests.helpers.speech import voiced_fraction
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.tts.speaker import Speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPLY = "Sure, the kitchen light is on now. Anything else I can do for you this evening?"
LONG = " ".join(f"This is sentence number {n} of a very long answer." for n in range(60))
ULAW_BIAS, ULAW_CLIP = 0x84, 32635


def ulaw_encode(pcm: np.ndarray) -> bytes:
    """G.711 mu-law (ITU-T G.711, written here from the standard)."""
    x = pcm.astype(np.int32)
    sign = (x < 0).astype(np.int32) << 7
    mag = np.minimum(np.abs(x), ULAW_CLIP) + ULAW_BIAS
    exponent = np.clip(np.floor(np.log2(mag)).astype(np.int32) - 7, 0, 7)
    mantissa = (mag >> (exponent + 3)) & 0x0F
    encoded: bytes = (~(sign | (exponent << 4) | mantissa) & 0xFF).astype(np.uint8).tobytes()
    return encoded


def ulaw_decode(data: bytes) -> bytes:
    u = ~np.frombuffer(data, np.uint8).astype(np.int32) & 0xFF
    exponent, mantissa = (u >> 4) & 0x07, u & 0x0F
    mag = (((mantissa << 3) + ULAW_BIAS) << exponent) - ULAW_BIAS
    return np.where(u & 0x80, -mag, mag).astype("<i2").tobytes()


async def test_g711_mu_law_in_and_out(piper: Speech, audio_dir: Path) -> None:
    """A telephony bridge: 8 kHz mu-law in (server VAD ends the turn), 8 kHz
    mu-law out, with speech in it once decoded."""
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    data, rate = soundfile.read(str(audio_dir / "ldc93s1-16k-mono.wav"), dtype="float32")
    audio = soxr.resample(data, rate, 8000)
    audio = np.concatenate([np.zeros(4000), audio, np.zeros(12000)])
    ulaw = ulaw_encode((np.clip(audio, -1, 1) * 32767).astype(np.int16))
    pcmu = {"type": "audio/pcmu"}
    async with (
        openai_server(engine, speech=piper, max_new_tokens=1000) as app,
        realtime(app) as (conn, log),
    ):
        updated = await update_session(
            conn,
            log,
            output_modalities=["audio"],
            audio={
                "input": {"format": pcmu, "turn_detection": {"type": "server_vad"}},
                "output": {"format": pcmu},
            },
        )
        assert updated["session"]["audio"]["input"]["format"]["type"] == "audio/pcmu"
        assert updated["session"]["audio"]["output"]["format"]["type"] == "audio/pcmu"
        for i in range(0, len(ulaw), 160):  # 20 ms at 8 kHz, 2x real time
            chunk = base64.b64encode(ulaw[i : i + 160]).decode("ascii")
            await conn.send({"type": "input_audio_buffer.append", "audio": chunk})
            await asyncio.sleep(0.01)
        done = await log.wait("response.done")
    assert log.of("input_audio_buffer.speech_stopped")
    assert done["response"]["status"] == "completed"
    check_response(log, done, modality="audio")
    rid = done["response"]["id"]
    out = b"".join(
        base64.b64decode(d["delta"]) for d in log.of("response.output_audio.delta", response_id=rid)
    )
    assert len(out) > 2 * 8000  # one byte a sample: over 2 s of speech
    assert voiced_fraction(ulaw_decode(out), 8000) > 0.4


async def test_semantic_vad_voice_turn(tiny_engine: Qwen2AudioEngine, audio_dir: Path) -> None:
    """semantic_vad (LiveKit's default) ends a spoken turn too."""
    pcm = pcm24(audio_dir / "ldc93s1-16k-mono.wav", after=3.0)
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        vad = {"type": "semantic_vad", "eagerness": "high", "create_response": True}
        updated = await update_session(
            conn, log, output_modalities=["text"], audio={"input": {"turn_detection": vad}}
        )
        assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == "semantic_vad"
        await append_audio(conn.send, pcm)
        done = await log.wait("response.done")
    assert len(log.of("input_audio_buffer.committed")) == 1
    assert finished(done), done["response"]


async def test_response_options(tiny_engine: Qwen2AudioEngine) -> None:
    """Per-response instructions, metadata (echoed) and max_output_tokens;
    rate_limits.updated after the response."""
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"], instructions="Be brief.")
        assert log.of("session.updated")[-1]["session"]["instructions"] == "Be brief."
        await say(conn, log, "Tell me a story.")
        meta = {"purpose": "o2-test"}
        done = await respond(
            conn, log, instructions="Answer in French.", metadata=meta, max_output_tokens=3
        )
        await log.wait("rate_limits.updated")
    created = log.of("response.created")[0]["response"]
    assert created["metadata"] == meta and done["response"]["metadata"] == meta
    assert done["response"]["usage"]["output_tokens"] <= 3


async def test_max_output_tokens_ends_incomplete() -> None:
    """A reply cut by max_output_tokens: response.done status "incomplete",
    status_details {type: incomplete, reason: max_output_tokens} (GA)."""
    engine = ScriptedEngine([LONG], token_delay=0.001)
    async with openai_server(engine, max_new_tokens=1000) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        await say(conn, log, "Talk")
        done = await respond(conn, log, max_output_tokens=5)
    response = done["response"]
    assert response["usage"]["output_tokens"] == 5
    assert response["status"] == "incomplete", response
    assert response["status_details"]["type"] == "incomplete"
    assert response["status_details"]["reason"] == "max_output_tokens"


async def test_one_response_at_a_time() -> None:
    engine = ScriptedEngine([LONG, "Yes."], token_delay=0.05)
    async with (
        openai_server(engine, max_new_tokens=1000) as app,
        realtime(app) as (conn, log),
    ):
        await update_session(conn, log, output_modalities=["text"])
        await say(conn, log, "Talk")
        await conn.send({"type": "response.create"})
        await log.wait("response.output_text.delta")
        await conn.send({"type": "response.create", "event_id": "evt_second"})
        error = await log.wait("error", errors_ok=True)
        await conn.send({"type": "response.cancel"})
        done = await log.wait("response.done")
    assert error["error"]["code"] == "conversation_already_has_active_response"
    assert error["error"]["event_id"] == "evt_second"
    assert done["response"]["status"] == "cancelled"
    assert len(log.of("response.created")) == 1


async def test_items_retrieve_delete_and_duplicates(tiny_engine: Qwen2AudioEngine) -> None:
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        first = (await say(conn, log, "Hello"))["item"]
        await conn.send({"type": "conversation.item.retrieve", "item_id": first["id"]})
        retrieved = await log.wait("conversation.item.retrieved")
        assert retrieved["item"]["id"] == first["id"]
        assert retrieved["item"]["content"][0]["text"] == "Hello"
        # a user item not yet answered can go
        await conn.send({"type": "conversation.item.delete", "item_id": first["id"]})
        deleted = await log.wait("conversation.item.deleted")
        assert deleted["item_id"] == first["id"]
        second = (await say(conn, log, "Hello again"))["item"]
        done = await respond(conn, log)
        assert finished(done), done["response"]
        item = {
            "id": second["id"],
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "again"}],
        }
        await conn.send({"type": "conversation.item.create", "item": item, "event_id": "evt_dup"})
        dup = await log.wait("error", errors_ok=True)
        await conn.send({"type": "conversation.item.retrieve", "item_id": "item_nope"})
        missing = await log.wait("error", 2, errors_ok=True)
    assert dup["error"]["code"] == "item_create_duplicate_item_id"
    assert dup["error"]["event_id"] == "evt_dup"
    assert missing["error"]["type"] == "invalid_request_error"


async def test_input_buffer_clear_and_odd_bytes(tiny_engine: Qwen2AudioEngine) -> None:
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(
            conn, log, output_modalities=["text"], audio={"input": {"turn_detection": None}}
        )
        await append_audio(conn.send, bytes(4800), chunk_ms=100, speed=0)
        await conn.send({"type": "input_audio_buffer.clear"})
        await log.wait("input_audio_buffer.cleared")
        await conn.send({"type": "input_audio_buffer.commit", "event_id": "evt_empty"})
        empty = await log.wait("error", errors_ok=True)
        odd = base64.b64encode(b"\x01\x02\x03").decode("ascii")
        await conn.send({"type": "input_audio_buffer.append", "audio": odd, "event_id": "evt_odd"})
        odd_error = await log.wait("error", 2, errors_ok=True)
        await say(conn, log, "Still here?")
        done = await respond(conn, log)
    assert empty["error"]["code"] == "input_audio_buffer_commit_empty"
    assert odd_error["error"]["event_id"] == "evt_odd"
    assert finished(done), done["response"]


def sync_turn(url: str) -> tuple[list[str], str]:
    """One typed turn with the SDK's synchronous client (its own thread)."""
    from openai import OpenAI

    client = OpenAI(base_url=url, api_key=KEY, max_retries=0)
    kinds: list[str] = []
    with client.realtime.connect(model=MODEL) as conn:
        conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        conn.conversation.item.create(
            item={
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "Hello"}],
            }
        )
        conn.response.create()
        for event in conn:
            kinds.append(event.type)
            if event.type == "response.done":
                return kinds, event.response.status or ""
    return kinds, ""


async def test_the_synchronous_client(tiny_engine: Qwen2AudioEngine) -> None:
    async with openai_server(tiny_engine) as app:
        kinds, status = await asyncio.to_thread(sync_turn, base_url(app))
    assert kinds[0] == "session.created" and kinds[-1] == "response.done", kinds
    assert "error" not in kinds, kinds
    assert status in ("completed", "incomplete")


def alaw_decode(data: bytes) -> bytes:
    """G.711 A-law to PCM16 (ITU-T G.711)."""
    a = np.frombuffer(data, np.uint8).astype(np.int32) ^ 0x55
    exponent, mantissa = (a >> 4) & 0x07, a & 0x0F
    mag = np.where(exponent == 0, (mantissa << 4) + 8, ((mantissa << 4) + 0x108) << (exponent - 1))
    return np.where(a & 0x80, mag, -mag).astype("<i2").tobytes()


async def test_g711_a_law_out(piper: Speech) -> None:
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    async with (
        openai_server(engine, speech=piper, max_new_tokens=1000) as app,
        realtime(app) as (conn, log),
    ):
        await update_session(
            conn,
            log,
            output_modalities=["audio"],
            audio={"output": {"format": {"type": "audio/pcma"}}},
        )
        await say(conn, log, "Lights please")
        done = await respond(conn, log)
    rid = done["response"]["id"]
    out = b"".join(
        base64.b64decode(d["delta"]) for d in log.of("response.output_audio.delta", response_id=rid)
    )
    assert len(out) > 2 * 8000
    assert voiced_fraction(alaw_decode(out), 8000) > 0.4


async def test_input_audio_transcription(tiny_engine: Qwen2AudioEngine, audio_dir: Path) -> None:
    """audio.input.transcription on: each user audio item gets
    conversation.item.input_audio_transcription.* for its item id (the tiny
    model's transcript is noise: only the events are checked)."""
    pcm = pcm24(audio_dir / "ldc93s1-16k-mono.wav")
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(
            conn,
            log,
            output_modalities=["text"],
            audio={
                "input": {
                    "transcription": {"model": "whisper-1", "language": "en"},
                    "turn_detection": {"type": "server_vad", "silence_duration_ms": 600},
                }
            },
        )
        await append_audio(conn.send, pcm)
        committed = await log.wait("input_audio_buffer.committed")
        completed = await log.wait("conversation.item.input_audio_transcription.completed")
        await log.wait("response.done")
    assert completed["item_id"] == committed["item_id"]
    assert completed["content_index"] == 0 and isinstance(completed["transcript"], str)
    deltas = log.of(
        "conversation.item.input_audio_transcription.delta", item_id=committed["item_id"]
    )
    assert "".join(d["delta"] for d in deltas) == completed["transcript"]


async def test_create_response_false_waits_for_response_create(
    tiny_engine: Qwen2AudioEngine, audio_dir: Path
) -> None:
    """server_vad with create_response false: the turn is committed, and
    answered only on response.create."""
    pcm = pcm24(audio_dir / "ldc93s1-16k-mono.wav")
    vad = {"type": "server_vad", "silence_duration_ms": 600, "create_response": False}
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(
            conn, log, output_modalities=["text"], audio={"input": {"turn_detection": vad}}
        )
        await append_audio(conn.send, pcm)
        committed = await log.wait("input_audio_buffer.committed")
        await log.quiet(1.0)
        assert not log.of("response.created")
        done = await respond(conn, log)
    assert finished(done), done["response"]
    assert committed["item_id"] in [e["item"]["id"] for e in log.of("conversation.item.added")]


async def test_idle_timeout(tiny_engine: Qwen2AudioEngine) -> None:
    """idle_timeout_ms: after a response, that much input without speech
    gets input_audio_buffer.timeout_triggered and a new response."""
    vad = {"type": "server_vad", "silence_duration_ms": 600, "idle_timeout_ms": 5000}
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(
            conn, log, output_modalities=["text"], audio={"input": {"turn_detection": vad}}
        )
        await say(conn, log, "Hello")
        await respond(conn, log)
        await append_audio(conn.send, silence(7.0), chunk_ms=100, speed=0)
        triggered = await log.wait("input_audio_buffer.timeout_triggered")
        done = await log.wait("response.done", 2)
    assert triggered["audio_end_ms"] - triggered["audio_start_ms"] >= 5000 - 100
    assert finished(done), done["response"]
