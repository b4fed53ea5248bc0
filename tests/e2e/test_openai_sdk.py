"""The official `openai` SDK (AsyncOpenAI(...).realtime.connect) against a
real voice_agent server on loopback, the tiny random Qwen2-Audio loaded with
from_pretrained, replies spoken with Piper.

Black-box: the SDK builds ws://127.0.0.1:PORT/v1/realtime?model=qwen2-audio
from base_url and sends `Authorization: Bearer KEY`, exactly as it would to
OpenAI. The tiny model's replies are noise: the tests check events, ids,
statuses and audio, never what is said. Every server event is also checked
against the SDK's own GA event models (openai_support.schema_problem).
(Replies that must be long or speakable: test_openai_sdk_control.py.)
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.e2e.openai_support import (
    KEY,
    MODEL,
    EventLog,
    append_audio,
    check_response,
    finished,
    openai_server,
    pcm24,
    realtime,
    respond,
    say,
    sdk,
    silence,
    update_session,
)
from voice_agent.client import RealtimeClient
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.tts.speaker import Speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

SERVER_VAD = {"type": "server_vad", "silence_duration_ms": 600, "create_response": True}


async def test_server_vad_voice_turn(
    tiny_engine: Qwen2AudioEngine, piper: Speech, audio_dir: Path
) -> None:
    """A spoken turn streamed as 24 kHz pcm16 appends: the server's VAD finds
    the speech, commits it as a user item and answers it in audio."""
    pcm = pcm24(audio_dir / "ldc93s1-16k-mono.wav")
    async with openai_server(tiny_engine, speech=piper) as app, realtime(app) as (conn, log):
        created = log.of("session.created")[0]["session"]
        assert created["type"] == "realtime" and created["model"] == MODEL  # the ?model= echoed
        updated = await update_session(
            conn,
            log,
            output_modalities=["audio"],
            audio={
                "input": {
                    "format": {"type": "audio/pcm", "rate": 24000},
                    "turn_detection": SERVER_VAD,
                },
                "output": {"format": {"type": "audio/pcm", "rate": 24000}},
            },
        )
        assert updated["session"]["audio"]["input"]["turn_detection"]["type"] == "server_vad"
        await append_audio(conn.send, pcm)
        done = await log.wait("response.done")
    started = log.of("input_audio_buffer.speech_started")
    stopped = log.of("input_audio_buffer.speech_stopped")
    committed = log.of("input_audio_buffer.committed")
    assert len(started) == len(stopped) == len(committed) == 1, log.types()
    item_id = committed[0]["item_id"]
    assert started[0]["item_id"] == stopped[0]["item_id"] == item_id
    # 0.5 s of silence, then 2.9 s of speech: the edges fall inside the stream
    assert 0 <= started[0]["audio_start_ms"] < stopped[0]["audio_end_ms"] <= 5000
    (user,) = [e for e in log.of("conversation.item.added") if e["item"]["id"] == item_id]
    assert user["item"]["role"] == "user"
    assert [c["type"] for c in user["item"]["content"]] == ["input_audio"]
    kinds = log.types()
    assert kinds.index("input_audio_buffer.committed") < kinds.index("response.created")
    assert finished(done), done["response"]
    check_response(log, done, modality="audio")
    usage = done["response"]["usage"]
    assert usage["input_tokens"] > 0 and 1 <= usage["output_tokens"] <= 12


async def test_typed_items_and_response_create(tiny_engine: Qwen2AudioEngine) -> None:
    """conversation.item.create (input_text) + response.create, twice: each
    item is added with its id and its place in the conversation; each
    response completes in text; the second one's prompt reuses the cache."""
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        first = await say(conn, log, "Hello there, how are you?")
        assert first["item"]["role"] == "user" and first["item"]["id"]
        assert first["item"]["content"][0]["type"] == "input_text"
        await log.wait(
            "conversation.item.done", where=lambda e: e["item"]["id"] == first["item"]["id"]
        )
        done1 = await respond(conn, log)
        reply1 = check_response(log, done1, modality="text")
        second = await say(conn, log, "And what is the weather like?")
        done2 = await respond(conn, log)
        reply2 = check_response(log, done2, modality="text")
    assert finished(done1) and finished(done2), (done1, done2)
    ids = [first["item"]["id"], reply1["id"], second["item"]["id"], reply2["id"]]
    assert len(set(ids)) == 4, ids
    assert done1["response"]["id"] != done2["response"]["id"]
    # each new item is placed after the last one
    assert second["previous_item_id"] == reply1["id"]
    text = log.of("response.output_text.done", response_id=done1["response"]["id"])
    deltas = log.of("response.output_text.delta", response_id=done1["response"]["id"])
    assert text[0]["text"] == "".join(d["delta"] for d in deltas)
    usage = done2["response"]["usage"]
    assert usage["input_tokens"] > 0 and 1 <= usage["output_tokens"] <= 12
    assert usage["input_token_details"]["cached_tokens"] > 0  # the first turn's KV kept


async def test_item_with_a_client_id(tiny_engine: Qwen2AudioEngine) -> None:
    """A client-chosen item id (Pipecat sends one) is kept."""
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        await conn.send(
            {
                "type": "conversation.item.create",
                "item": {
                    "id": "item_client_0001",
                    "type": "message",
                    "role": "user",
                    "content": [{"type": "input_text", "text": "Hi"}],
                },
            }
        )
        added = await log.wait("conversation.item.added")
        done = await respond(conn, log)
    assert added["item"]["id"] == "item_client_0001"
    assert finished(done), done["response"]


async def test_manual_turn_with_commit(tiny_engine: Qwen2AudioEngine, audio_dir: Path) -> None:
    """turn_detection null: the audio waits in the buffer until the client
    commits it (no VAD events) and answers only on response.create."""
    pcm = pcm24(audio_dir / "ldc93s1-16k-mono.wav", before=0.2, after=0.2)
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        updated = await update_session(
            conn, log, output_modalities=["text"], audio={"input": {"turn_detection": None}}
        )
        assert updated["session"]["audio"]["input"]["turn_detection"] is None
        await append_audio(conn.send, pcm, chunk_ms=100, speed=0)
        await append_audio(conn.send, silence(1.5), chunk_ms=100, speed=0)
        later = await log.quiet(1.0)
        assert not [e for e in later if e["type"].startswith(("input_audio_buffer", "response"))]
        await conn.send({"type": "input_audio_buffer.commit"})
        committed = await log.wait("input_audio_buffer.committed")
        added = await log.wait(
            "conversation.item.added", where=lambda e: e["item"]["id"] == committed["item_id"]
        )
        assert not log.of("response.created")  # no reply without response.create
        done = await respond(conn, log)
    assert added["item"]["id"] == committed["item_id"]
    assert added["item"]["role"] == "user"
    assert [c["type"] for c in added["item"]["content"]] == ["input_audio"]
    kinds = log.types()
    assert "input_audio_buffer.speech_started" not in kinds
    assert "input_audio_buffer.speech_stopped" not in kinds
    assert finished(done), done["response"]
    check_response(log, done, modality="text")
    assert done["response"]["usage"]["input_tokens"] > 0


async def test_commit_of_an_empty_buffer_is_an_error(tiny_engine: Qwen2AudioEngine) -> None:
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(
            conn, log, output_modalities=["text"], audio={"input": {"turn_detection": None}}
        )
        await conn.send({"type": "input_audio_buffer.commit", "event_id": "evt_commit_1"})
        error = await log.wait("error", errors_ok=True)
        assert error["error"]["event_id"] == "evt_commit_1"
        assert error["error"]["type"] == "invalid_request_error"
        # the connection lives on
        await say(conn, log, "Still there?")
        done = await respond(conn, log)
    assert finished(done), done["response"]


async def test_malformed_events_get_error_and_the_connection_lives(
    tiny_engine: Qwen2AudioEngine,
) -> None:
    """Not JSON, an unknown type, a known type with a bad field, a tool: each
    gets an `error` naming it; the connection stays and answers the next
    request."""
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await update_session(conn, log, output_modalities=["text"])
        await conn.send_raw("{this is not json")
        await log.wait("error", errors_ok=True)
        await conn.send_raw('{"type": "no.such.event", "event_id": "evt_unknown"}')
        unknown = await log.wait("error", 2, errors_ok=True)
        await conn.send_raw(
            '{"type": "input_audio_buffer.append", "event_id": "evt_b64", "audio": "%%%not-base64"}'
        )
        bad_audio = await log.wait("error", 3, errors_ok=True)
        tool = {"type": "function", "name": "lights", "parameters": {"type": "object"}}
        session = {"type": "realtime", "tools": [tool]}
        await conn.send_raw(
            json.dumps({"type": "session.update", "event_id": "evt_tools", "session": session})
        )
        tools = await log.wait("error", 4, errors_ok=True)
        assert log.closed is None
        n = len(log.errors())
        await say(conn, log, "Are you still there?")
        done = await respond(conn, log)
        assert len(log.errors()) == n  # nothing else went wrong
    assert unknown["error"]["event_id"] == "evt_unknown"
    assert bad_audio["error"]["event_id"] == "evt_b64"
    assert tools["error"]["event_id"] == "evt_tools"
    assert "tool" in tools["error"]["message"].lower()
    for error in log.errors():
        assert error["error"]["type"] == "invalid_request_error", error
        assert error["error"]["message"], error
    assert finished(done), done["response"]


async def test_response_cancel_without_a_response(tiny_engine: Qwen2AudioEngine) -> None:
    """The code clients (Pipecat) tell from a fatal error."""
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await conn.send({"type": "response.cancel"})
        error = await log.wait("error", errors_ok=True)
        assert error["error"]["code"] == "response_cancel_not_active"
        await update_session(conn, log, output_modalities=["text"])
        await say(conn, log, "Hello?")
        done = await respond(conn, log)
    assert finished(done), done["response"]


async def test_a_wrong_key_is_refused_with_401(tiny_engine: Qwen2AudioEngine) -> None:
    async with openai_server(tiny_engine) as app:
        with pytest.raises(InvalidStatus) as refused:
            async with sdk(app, key="not-the-key").realtime.connect(model=MODEL) as conn:
                await conn.recv()
        assert refused.value.response.status_code == 401
        # the right key on the same server works
        async with realtime(app) as (_conn, log):
            assert log.of("session.created")


async def test_the_key_as_a_browser_subprotocol(tiny_engine: Qwen2AudioEngine) -> None:
    """Browsers cannot set headers: openai-insecure-api-key.KEY; the server
    selects `realtime`. A wrong key that way is refused with 401 too."""
    async with openai_server(tiny_engine) as app:
        url = f"ws://127.0.0.1:{app.port}/v1/realtime?model={MODEL}"
        offered = ["realtime", f"openai-insecure-api-key.{KEY}"]
        async with connect(url, subprotocols=offered) as ws:  # type: ignore[arg-type]
            assert ws.subprotocol == "realtime"
            async with EventLog(ws.recv) as log:
                await log.wait("session.created")
        wrong = ["realtime", "openai-insecure-api-key.wrong"]
        with pytest.raises(InvalidStatus) as refused:
            async with connect(url, subprotocols=wrong):  # type: ignore[arg-type]
                pass
        assert refused.value.response.status_code == 401


async def test_native_and_openai_clients_on_one_server(tiny_engine: Qwen2AudioEngine) -> None:
    """/v1/realtime without `model` stays the native protocol, with it the
    OpenAI one, at the same time on the same server."""
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        async with RealtimeClient(app.url) as native:
            started = await native.start(token=KEY)
            assert started.session_id
            await update_session(conn, log, output_modalities=["text"])
            await say(conn, log, "Hello")
            done = await respond(conn, log)
        assert finished(done), done["response"]


async def test_origin_rules_are_the_native_ones(tiny_engine: Qwen2AudioEngine) -> None:
    """A browser page of another site is refused (as a native session is:
    close 1008, or an HTTP refusal at the handshake); the server's own page
    and an allowed origin get their session."""
    async with openai_server(tiny_engine, allowed_origins=("https://home.example",)) as app:
        url = f"ws://127.0.0.1:{app.port}/v1/realtime?model={MODEL}"
        offered = ["realtime", f"openai-insecure-api-key.{KEY}"]
        for origin in ("http://evil.example", "https://home.example.evil"):
            try:
                async with connect(url, subprotocols=offered, origin=origin) as ws:  # type: ignore[arg-type]
                    async with EventLog(ws.recv) as log, asyncio.timeout(30):
                        while log.closed is None:
                            await asyncio.sleep(0.05)
                    assert not log.of("session.created"), origin
                    assert ws.close_code == 1008, (origin, ws.close_code)
            except InvalidStatus as refused:
                assert refused.response.status_code in (401, 403), origin
        for origin in ("https://home.example", f"http://127.0.0.1:{app.port}"):
            async with (
                connect(url, subprotocols=offered, origin=origin) as ws,  # type: ignore[arg-type]
                EventLog(ws.recv) as log,
            ):
                await log.wait("session.created")
