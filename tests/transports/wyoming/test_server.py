"""The Wyoming server on loopback, driven by the wyoming package's own
AsyncTcpClient: describe, transcribe, handle, synthesize, bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from wyoming.asr import Transcribe, Transcript
from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.handle import Handled, NotHandled
from wyoming.info import Describe, Info
from wyoming.tts import (
    Synthesize,
    SynthesizeChunk,
    SynthesizeStart,
    SynthesizeStop,
    SynthesizeVoice,
)

from tests.transports.wyoming.support import TRANSCRIPT, read_until, serving


def speech_pcm(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(round(seconds * rate)) / rate
    return (np.sin(2 * np.pi * 300 * t) * 8000).astype("<i2").tobytes()


async def test_describe_answers_info_with_asr_handle_and_tts(tmp_path: Path) -> None:
    async with serving(tmp_path) as served, served.client() as client:
        await client.write_event(Describe().event())
        (event,) = await read_until(client, "info")
        info = Info.from_event(event)
        assert [p.name for p in info.asr] == ["voice_agent"]
        assert info.asr[0].installed and info.asr[0].supports_transcript_streaming
        assert info.asr[0].models[0].name == "scripted"
        assert "en" in info.asr[0].models[0].languages
        assert info.handle[0].installed and info.handle[0].models[0].installed
        assert info.tts[0].voices[0].name == "tone"
        assert info.tts[0].supports_synthesize_streaming


async def test_no_tts_program_when_the_server_does_not_speak(tmp_path: Path) -> None:
    async with serving(tmp_path, speak=False) as served, served.client() as client:
        await client.write_event(Describe().event())
        (event,) = await read_until(client, "info")
        assert Info.from_event(event).tts == []
        await client.write_event(Synthesize(text="Hello.").event())
        (error,) = await read_until(client, "error")
        assert Error.from_event(error).code == "unsupported"


async def test_transcribe_home_assistant_sequence(tmp_path: Path) -> None:
    """Home Assistant's stt.py: transcribe, audio-start, chunks, audio-stop -> transcript."""
    async with serving(tmp_path) as served, served.client() as client:
        await client.write_event(Transcribe(language="en").event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        pcm = speech_pcm()
        for i in range(0, len(pcm), 2048):
            chunk = AudioChunk(rate=16000, width=2, channels=1, audio=pcm[i : i + 2048])
            await client.write_event(chunk.event())
        await client.write_event(AudioStop().event())
        events = await read_until(client, "transcript-stop")
        types = [e.type for e in events]
        assert types[0] == "transcript-start" and types[-2:] == ["transcript", "transcript-stop"]
        assert "transcript-chunk" in types
        assert Transcript.from_event(events[-2]).text == TRANSCRIPT
        # outside any conversation: the turn ran on its own throwaway conversation
        ((conversation, turn),) = served.engine.submitted
        assert conversation.conversation_id.startswith("wyoming-transcript-")
        assert turn.audio is not None and abs(len(turn.audio) - 16000) <= 2
        assert turn.text is not None and "language is en" in turn.text


async def test_audio_at_another_rate_width_and_channels_is_converted(tmp_path: Path) -> None:
    async with serving(tmp_path) as served, served.client() as client:
        await client.write_event(AudioStart(rate=44100, width=4, channels=2).event())
        mono = np.frombuffer(speech_pcm(0.5, 44100), dtype="<i2").astype(np.int32) << 16
        pcm = np.repeat(mono[:, None], 2, axis=1).astype("<i4").tobytes()
        await client.write_event(AudioChunk(rate=44100, width=4, channels=2, audio=pcm).event())
        await client.write_event(AudioStop().event())
        await read_until(client, "transcript-stop")
        ((_, turn),) = served.engine.submitted
        assert turn.audio is not None and abs(len(turn.audio) - 8000) <= 2


async def test_handle_replies_and_sends_the_commands_to_the_bus(tmp_path: Path) -> None:
    """Home Assistant's conversation.py: transcript with context -> handled."""
    async with serving(tmp_path) as served:
        delivered = []

        async def websocket_session(command: object) -> None:
            delivered.append(command)

        served.services.bus.subscribe("kitchen_speaker", websocket_session)
        context = {"conversation_id": "01HS6SP2XD1E5HEHVDZE8R2WMR", "device_id": "kitchen_speaker"}
        for _ in range(2):
            async with served.client() as client:
                await client.write_event(
                    Transcript("turn on the light", context=context, language="en").event()
                )
                (event,) = await read_until(client, "handled", "not-handled", "error")
                handled = Handled.from_event(event)
                assert event.type == "handled" and handled.text is not None
                assert handled.text.startswith("Done.") and "<command>" not in handled.text
                assert handled.context == {"conversation_id": context["conversation_id"]}
        assert [(d, c.action, c.target) for d, c in served.published] == [
            ("kitchen_speaker", "on", "light.kitchen")
        ] * 2
        assert len(delivered) == 2
        host = served.services.host
        assert host is not None
        key = "wyoming:01HS6SP2XD1E5HEHVDZE8R2WMR"
        assert host.conversations.kept[key] is not None  # one conversation, kept
        texts = [t.text for c, t in served.engine.submitted if c.conversation_id == key]
        assert texts == ["turn on the light"] * 2


async def test_handle_failures_are_not_handled(tmp_path: Path) -> None:
    async with serving(tmp_path, max_text_chars=10) as served, served.client() as client:
        too_long = Transcript("x" * 50, context={"conversation_id": "abc"}).event()
        await client.write_event(too_long)
        (event,) = await read_until(client, "handled", "not-handled")
        assert event.type == "not-handled" and NotHandled.from_event(event).text
        await client.write_event(
            Event("transcript", {"text": "hi", "context": {"conversation_id": "a b"}})
        )
        (event,) = await read_until(client, "handled", "not-handled")
        assert event.type == "not-handled"


async def test_synthesize_streams_audio(tmp_path: Path) -> None:
    async with serving(tmp_path) as served, served.client() as client:
        await client.write_event(Synthesize(text="Hello there. How are you?").event())
        events = await read_until(client, "audio-stop")
        assert events[0].type == "audio-start"
        start = AudioStart.from_event(events[0])
        assert (start.rate, start.width, start.channels) == (22050, 2, 1)
        pcm = b"".join(AudioChunk.from_event(e).audio for e in events[1:-1])
        assert len(pcm) == 2 * 2 * round(0.25 * 22050)  # two sentences of 0.25 s
        assert np.abs(np.frombuffer(pcm, dtype="<i2")).max() > 1000
        assert served.tts.said == ["Hello there.", "How are you?"]


async def test_streaming_synthesis_ignores_the_compatibility_copy(tmp_path: Path) -> None:
    """Home Assistant streams: synthesize-start, chunks, a full `synthesize` for older
    servers, synthesize-stop -> one audio stream, then synthesize-stopped."""
    async with serving(tmp_path) as served, served.client() as client:
        await client.write_event(SynthesizeStart().event())
        for part in ["Hello ", "there. How ", "are you?"]:
            await client.write_event(SynthesizeChunk(text=part).event())
        await client.write_event(Synthesize(text="Hello there. How are you?").event())
        await client.write_event(SynthesizeStop().event())
        events = await read_until(client, "synthesize-stopped")
        types = [e.type for e in events]
        assert types[0] == "audio-start" and types[-2:] == ["audio-stop", "synthesize-stopped"]
        assert types.count("audio-start") == 1
        assert served.tts.said == ["Hello there.", "How are you?"]


async def test_bad_input_gets_errors_and_the_connection_lives_on(tmp_path: Path) -> None:
    async with serving(tmp_path) as served, served.client() as client:
        await client.write_event(Event("no-such-event"))
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=b"\0\0").event())
        await client.write_event(AudioStart(rate=16000, width=7, channels=1).event())
        await client.write_event(AudioStop().event())
        await client.write_event(AudioStart(rate=16000, width=2, channels=1).event())
        await client.write_event(AudioChunk(rate=16000, width=2, channels=1, audio=b"\0").event())
        errors = []
        for _ in range(5):
            (event,) = await read_until(client, "error")
            errors.append(Error.from_event(event).code)
        assert errors == ["bad_message", "bad_message", "bad_audio", "bad_message", "bad_audio"]
        await client.write_event(Describe().event())
        await read_until(client, "info")
        wyoming = served.services.wyoming
        assert wyoming is not None
        assert wyoming.stats.bad_events == 1 and wyoming.stats.bad_audio == 4


async def test_an_oversized_event_closes_only_that_connection(tmp_path: Path) -> None:
    async with serving(tmp_path) as served, served.client() as other:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b'{"type": "audio-chunk", "payload_length": 100000000}\n')
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), 20)  # an error event, then EOF
        assert b'"error"' in data and b"bad_message" in data
        writer.close()
        await other.write_event(Describe().event())
        await read_until(other, "info")
        metrics = served.services.host
        assert metrics is not None
        text = metrics.metrics.registry.get_sample_value(
            "voice_agent_transport_errors_total", {"transport": "wyoming", "code": "bad_message"}
        )
        assert text is not None and text >= 1


async def test_a_client_vanishing_mid_stream_is_counted(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        _reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b'{"type": "audio-chunk", "payload_length": 1000}\n' + b"\0" * 10)
        await writer.drain()
        writer.close()
        wyoming = served.services.wyoming
        assert wyoming is not None
        for _ in range(200):
            if wyoming.stats.vanished:
                break
            await asyncio.sleep(0.05)
        assert wyoming.stats.vanished == 1


async def test_a_synthesize_without_text_is_refused_and_the_next_one_spoken(tmp_path: Path) -> None:
    async with serving(tmp_path) as served, served.client() as client:
        await client.write_event(Event("synthesize", {"voice": {"name": "x"}}))
        (event,) = await read_until(client, "error")
        assert Error.from_event(event).code == "bad_message"
        await client.write_event(SynthesizeChunk(text="orphan").event())
        (event,) = await read_until(client, "error")  # no synthesize-start
        await client.write_event(Synthesize(text="Hi.", voice=SynthesizeVoice(name="any")).event())
        events = await read_until(client, "audio-stop")
        assert events[0].type == "audio-start" and len(events) > 2
        assert served.tts.said == ["Hi."]
