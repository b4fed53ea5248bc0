"""The official `openai` SDK against a real voice_agent server on loopback,
where a reply must be speakable or long enough to stop: the scripted engine
stands in for the model (the same paths run on the tiny Qwen2-Audio in
test_openai_sdk.py), Piper speaks. Spoken audio (decoded from the base64
response.output_audio.delta), response.cancel, barge-in with
interrupt_response, conversation.item.truncate.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.openai_support import (
    RATE,
    append_audio,
    check_response,
    openai_server,
    pcm24,
    pcm_of,
    realtime,
    respond,
    say,
    update_session,
)
from tests.helpers.speech import voiced_fraction
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.tts.speaker import Speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

REPLY = (
    "Sure, the kitchen light is on now. The living room stays dark as you asked. "
    "Anything else I can do for you this evening?"
)
LONG = " ".join(f"This is sentence number {n} of a very long answer." for n in range(60))
AUDIO_24K = {"type": "audio/pcm", "rate": RATE}
MAX_TOKENS = 1000  # the scripted engine's words are its tokens: the replies stay whole


async def test_audio_output_is_speech(piper: Speech) -> None:
    """output_modalities ["audio"]: the base64 deltas are 24 kHz PCM16 with
    speech in it, and the transcript is the reply's text."""
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    async with (
        openai_server(engine, speech=piper, max_new_tokens=MAX_TOKENS) as app,
        realtime(app) as (conn, log),
    ):
        await update_session(
            conn, log, output_modalities=["audio"], audio={"output": {"format": AUDIO_24K}}
        )
        await say(conn, log, "Lights please")
        done = await respond(conn, log)
    rid = done["response"]["id"]
    assert done["response"]["status"] == "completed"
    item = check_response(log, done, modality="audio")
    pcm = pcm_of(log.of("response.output_audio.delta", response_id=rid))
    assert len(pcm) % 2 == 0
    assert len(pcm) // 2 > 3 * RATE  # three sentences, all spoken
    assert voiced_fraction(pcm, RATE) > 0.4
    (transcript,) = log.of("response.output_audio_transcript.done", response_id=rid)
    assert transcript["transcript"].strip() == REPLY
    pieces = log.of("response.output_audio_transcript.delta", response_id=rid)
    assert "".join(p["delta"] for p in pieces) == transcript["transcript"]
    (part,) = log.of("response.content_part.done", response_id=rid)
    assert part["part"]["type"] == "audio" and part["item_id"] == item["id"]


async def test_response_cancel(piper: Speech) -> None:
    """response.cancel mid-reply: response.done with status cancelled, no
    event of that response after it, and the next response completes."""
    engine = ScriptedEngine([LONG, "Yes."], token_delay=0.05)  # about 35 s if not stopped
    async with (
        openai_server(engine, speech=piper, max_new_tokens=MAX_TOKENS) as app,
        realtime(app) as (conn, log),
    ):
        await update_session(conn, log, output_modalities=["audio"])
        await say(conn, log, "Talk to me")
        await conn.send({"type": "response.create"})
        first = await log.wait("response.output_audio.delta")
        rid = first["response_id"]
        await conn.send({"type": "response.cancel", "event_id": "evt_cancel"})
        done = await log.wait("response.done")
        after = await log.quiet(1.5)
        assert done["response"]["id"] == rid
        assert done["response"]["status"] == "cancelled", done
        assert not [e for e in after if e.get("response_id") == rid], after
        await say(conn, log, "Go on")
        again = await respond(conn, log)
    assert again["response"]["status"] == "completed"
    assert len(pcm_of(log.of("response.output_audio.delta", response_id=rid))) < 30 * RATE * 2


@pytest.mark.parametrize("interrupt", [True, False])
async def test_barge_in(piper: Speech, audio_dir: Path, interrupt: bool) -> None:
    """Server VAD while a reply plays: with interrupt_response true the
    user's speech cancels it (response.done cancelled) and a new response
    answers the speech; with false the first reply runs to its end."""
    reply = LONG if interrupt else REPLY
    engine = ScriptedEngine([reply, "Yes."], token_delay=0.05 if interrupt else 0.01)
    pcm = pcm24(audio_dir / "ldc93s1-16k-mono.wav", before=0.3, after=1.5)
    vad = {
        "type": "server_vad",
        "silence_duration_ms": 600,
        "create_response": True,
        "interrupt_response": interrupt,
    }
    async with (
        openai_server(engine, speech=piper, max_new_tokens=MAX_TOKENS) as app,
        realtime(app) as (conn, log),
    ):
        await update_session(
            conn, log, output_modalities=["audio"], audio={"input": {"turn_detection": vad}}
        )
        await say(conn, log, "Talk to me")
        await conn.send({"type": "response.create"})
        first = await log.wait("response.output_audio.delta")
        rid = first["response_id"]
        await append_audio(conn.send, pcm)
        committed = await log.wait("input_audio_buffer.committed")
        second = await log.wait("response.done", 2)
        # counted as the native protocol counts them
        assert app.metrics.barge_ins_total == (1 if interrupt else 0)
        assert app.metrics.utterances_total == 1 and app.metrics.turns_total == 2
    (started,) = log.of("input_audio_buffer.speech_started")
    (done1,) = [e for e in log.of("response.done") if e["response"]["id"] == rid]
    kinds = log.types()
    if interrupt:
        assert done1["response"]["status"] == "cancelled", done1
        # the reply is stopped while the user talks, before the speech ends
        assert log.events.index(started) < log.events.index(done1)
        assert kinds.index("response.done") < kinds.index("input_audio_buffer.speech_stopped")
    else:
        assert done1["response"]["status"] == "completed", done1
    assert second["response"]["id"] != rid
    assert second["response"]["status"] == "completed"
    user = [e for e in log.of("conversation.item.added") if e["item"]["id"] == committed["item_id"]]
    assert user and user[0]["item"]["role"] == "user"


async def test_conversation_item_truncate(piper: Speech) -> None:
    """Truncating the assistant's audio item at what the user heard gets
    conversation.item.truncated; past the audio's end it is an error; the
    conversation goes on."""
    engine = ScriptedEngine([REPLY, "Yes."], token_delay=0.01)
    async with (
        openai_server(engine, speech=piper, max_new_tokens=MAX_TOKENS) as app,
        realtime(app) as (conn, log),
    ):
        await update_session(conn, log, output_modalities=["audio"])
        await say(conn, log, "Lights please")
        done = await respond(conn, log)
        item = check_response(log, done, modality="audio")
        rid = done["response"]["id"]
        heard_ms = len(pcm_of(log.of("response.output_audio.delta", response_id=rid))) * 500 // RATE
        assert heard_ms > 1000
        await conn.send(
            {
                "type": "conversation.item.truncate",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": 800,
            }
        )
        truncated = await log.wait("conversation.item.truncated")
        assert truncated["item_id"] == item["id"]
        assert truncated["content_index"] == 0 and truncated["audio_end_ms"] == 800
        await conn.send(
            {
                "type": "conversation.item.truncate",
                "event_id": "evt_too_far",
                "item_id": item["id"],
                "content_index": 0,
                "audio_end_ms": heard_ms + 60_000,
            }
        )
        error = await log.wait("error", errors_ok=True)
        assert error["error"]["event_id"] == "evt_too_far"
        await conn.send(
            {"type": "conversation.item.retrieve", "item_id": item["id"], "event_id": "evt_get"}
        )
        retrieved = await log.wait("conversation.item.retrieved", errors_ok=True)
        await say(conn, log, "Thanks")
        again = await respond(conn, log)
    assert retrieved["item"]["id"] == item["id"]
    # the transcript is cut to what was heard (800 ms of a 3-sentence reply)
    transcript = retrieved["item"]["content"][0].get("transcript") or ""
    assert len(transcript) < len(REPLY)
    assert again["response"]["status"] == "completed"
