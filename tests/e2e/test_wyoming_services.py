"""The `wyoming` package's AsyncTcpClient, playing Home Assistant's Wyoming
integration event by event (tests/e2e/wyoming_support.py), against a real
voice_agent server on loopback: the tiny random Qwen2-Audio loaded with
from_pretrained, replies spoken with Piper.

The tiny model's words are noise: the tests check the event sequences, the
formats and the audio, never what is said.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest

from tests.e2e.wyoming_support import (
    audio_of,
    describe,
    handle,
    handled_text,
    recording,
    synthesize,
    synthesize_streaming,
    transcribe,
    transcript_of,
    types,
    wyoming_server,
)
from tests.helpers.speech import voiced_fraction
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.tts.speaker import Speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SENTENCES = ["Turn on the kitchen light, ", "please. ", "Then close the garage door."]


async def test_describe_lists_speech_to_text_conversation_and_voice(
    tiny_engine: Qwen2AudioEngine, piper: Speech
) -> None:
    """What Home Assistant's config flow reads: one installed program per
    service, with installed models/voices and their languages (the STT and
    conversation entities take their languages from the installed models)."""
    async with wyoming_server(tiny_engine, speech=piper) as server:
        info = await describe(server)
        again = await describe(server)  # every connection may describe
    assert again == info
    for programs in (info.asr, info.handle, info.tts):
        assert len(programs) >= 1 and programs[0].installed, info
        assert programs[0].name and programs[0].attribution.name, programs[0]
    asr, conv, tts = info.asr[0], info.handle[0], info.tts[0]
    assert any(m.installed and m.languages for m in asr.models), asr
    assert any(m.installed and m.languages for m in conv.models), conv
    assert any(v.installed and v.languages for v in tts.voices), tts
    assert tts.supports_synthesize_streaming, tts


async def test_transcribes_a_recording_as_home_assistant_sends_it(
    tiny_engine: Qwen2AudioEngine, audio_dir: Path
) -> None:
    """transcribe(en), audio-start 16 kHz/2/1, 10 ms chunks, audio-stop ->
    a transcript (its words are the tiny model's noise)."""
    pcm = recording(audio_dir / "ldc93s1-16k-mono.wav")
    assert (pcm.rate, pcm.width, pcm.channels) == (16000, 2, 1)
    async with wyoming_server(tiny_engine) as server:
        events = await transcribe(server, pcm)
        transcript_of(events)
        # the same connection-per-request again: nothing left over from the first
        transcript_of(await transcribe(server, pcm))


@pytest.mark.parametrize("name", ["ldc93s1-44k-stereo.wav", "ldc93s1-8k-mono.wav"])
async def test_transcribes_other_rates_and_channels(
    tiny_engine: Qwen2AudioEngine, audio_dir: Path, name: str
) -> None:
    """audio-start and audio-chunk at the recording's own rate and channel
    count (44.1 kHz stereo, 8 kHz mono): resampled by the server."""
    pcm = recording(audio_dir / name)
    assert (pcm.rate, pcm.channels) != (16000, 1)
    async with wyoming_server(tiny_engine) as server:
        transcript_of(await transcribe(server, pcm))


async def test_handles_a_transcript_on_its_conversation(tiny_engine: Qwen2AudioEngine) -> None:
    """conversation.py's one transcript (text, context.conversation_id,
    language) -> handled with the reply text, on the real model; the same
    conversation id again is answered too."""
    cid = uuid.uuid4().hex.upper()[:26]  # Home Assistant's ids are ULIDs
    async with wyoming_server(tiny_engine) as server:
        first = await handle(server, "What time is it?", cid)
        handled_text(first)
        second = await handle(server, "And tomorrow?", cid, device_id="abc123")
        handled_text(second)


async def test_speaks_a_synthesize_request(piper: Speech, tiny_engine: Qwen2AudioEngine) -> None:
    """async_get_tts_audio: synthesize with and without a voice -> audio-start,
    audio-chunks of that format, audio-stop; the PCM is speech."""
    text = "".join(SENTENCES)
    async with wyoming_server(tiny_engine, speech=piper) as server:
        info = await describe(server)
        name = next(v.name for v in info.tts[0].voices if v.installed)
        for voice_name in (None, name):
            events = await synthesize(server, text, voice_name)
            kinds = types(events)
            assert kinds[0] == "audio-start" and kinds[-1] == "audio-stop", kinds
            assert set(kinds[1:-1]) == {"audio-chunk"}, kinds
            pcm = audio_of(events)
            assert pcm.width == 2 and pcm.channels == 1, pcm.rate
            assert len(pcm.audio) > pcm.rate * 2  # more than a second
            assert voiced_fraction(pcm.audio, pcm.rate) > 0.4


async def test_streams_a_reply_written_in_pieces(
    piper: Speech, tiny_engine: Qwen2AudioEngine
) -> None:
    """async_stream_tts_audio: synthesize-start, chunks, the compatibility
    synthesize (ignored inside the stream), synthesize-stop -> audio for each
    part, then synthesize-stopped; the whole text is spoken once, not twice."""
    async with wyoming_server(tiny_engine, speech=piper) as server:
        streamed = await synthesize_streaming(server, SENTENCES)
        whole = audio_of(await synthesize(server, "".join(SENTENCES)))
    kinds = types(streamed)
    assert kinds and kinds[-1] == "synthesize-stopped", kinds
    assert "error" not in kinds, [e.data for e in streamed if e.type == "error"]
    # each audio-start ... audio-stop block is complete before the next
    depth = 0
    for kind in kinds[:-1]:
        depth += {"audio-start": 1, "audio-stop": -1}.get(kind, 0)
        assert depth in (0, 1) and (kind != "audio-chunk" or depth == 1), kinds
    assert depth == 0 and kinds.count("audio-start") >= 1, kinds
    pcm = audio_of(streamed)
    assert voiced_fraction(pcm.audio, pcm.rate) > 0.4
    seconds, once = len(pcm.audio) / (2 * pcm.rate), len(whole.audio) / (2 * whole.rate)
    assert 0.5 * once < seconds < 1.5 * once, (seconds, once)  # not spoken twice


async def test_clients_at_once(tiny_engine: Qwen2AudioEngine, audio_dir: Path) -> None:
    """Several Home Assistant requests at the same time (STT and conversation
    on the one engine): each gets its own answer."""
    pcm = recording(audio_dir / "new-home-in-the-stars-16k.wav")
    async with wyoming_server(tiny_engine) as server:
        results = await asyncio.gather(
            transcribe(server, pcm),
            transcribe(server, pcm),
            handle(server, "hello", "conv-a"),
            handle(server, "hello", "conv-b"),
        )
    transcript_of(results[0])
    transcript_of(results[1])
    handled_text(results[2])
    handled_text(results[3])
