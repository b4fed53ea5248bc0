"""Speech to text as Home Assistant asks for it (stt.py's sequence,
tests/e2e/wyoming_support.py), with a scripted engine so the transcript's
words are known: the streamed transcript events agree with the final one,
the engine hears the whole clip as 16 kHz mono whatever was sent, and a
transcription is a turn outside every conversation's history.

(The same sequences on the tiny Qwen2-Audio: test_wyoming_services.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import soundfile
from wyoming.asr import Transcript, TranscriptChunk
from wyoming.audio import AudioStop

from tests.e2e.wyoming_support import (
    handle,
    handled_text,
    read_until,
    recording,
    send_audio,
    start_transcription,
    transcribe,
    transcript_of,
    types,
    wyoming_server,
)
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SAID = "She had your dark suit in greasy wash water all year."


async def test_streamed_transcript_agrees_with_the_final_one(audio_dir: Path) -> None:
    """transcript-start, transcript-chunk..., transcript, transcript-stop:
    the chunks add up to the transcript Home Assistant takes (it stops
    reading at `transcript`; a client that streams reads on to the stop)."""
    pcm = recording(audio_dir / "ldc93s1-16k-mono.wav")
    async with wyoming_server(ScriptedEngine([SAID])) as server:
        text = transcript_of(await transcribe(server, pcm))
        assert text.strip() == SAID
        async with server.client() as client:
            await start_transcription(client, pcm)
            await send_audio(client, pcm, [pcm.audio])  # one chunk: any size goes
            await client.write_event(AudioStop().event())
            events = await read_until(client, "transcript-stop")
    kinds = types(events)
    assert "transcript" in kinds, kinds
    final = kinds.index("transcript")
    if "transcript-chunk" in kinds:  # streamed: start, chunks, the transcript, stop
        assert kinds[0] == "transcript-start" and kinds[-1] == "transcript-stop", kinds
        assert set(kinds[1:final]) == {"transcript-chunk"}, kinds
        chunks = [TranscriptChunk.from_event(e).text for e in events[1:final]]
        assert "".join(chunks).strip() == Transcript.from_event(events[final]).text.strip()
    assert Transcript.from_event(events[final]).text.strip() == SAID


@pytest.mark.parametrize(
    "name", ["ldc93s1-16k-mono.wav", "ldc93s1-44k-stereo.wav", "ldc93s1-8k-mono.wav"]
)
async def test_the_engine_hears_the_whole_clip_at_16k(audio_dir: Path, name: str) -> None:
    """Whatever rate and channels audio-start says, the engine gets the clip
    as 16 kHz mono samples, all of it, with a transcription instruction."""
    path = audio_dir / name
    seconds = soundfile.info(str(path)).duration
    engine = ScriptedEngine([SAID])
    async with wyoming_server(engine) as server:
        transcript_of(await transcribe(server, recording(path)))
    assert len(engine.submitted) == 1
    _, turn = engine.submitted[0]
    assert turn.audio is not None and turn.audio.ndim == 1
    assert abs(len(turn.audio) - seconds * 16000) <= 0.01 * seconds * 16000, len(turn.audio)
    assert turn.text, "no transcription instruction"


async def test_a_transcription_is_outside_every_conversation(audio_dir: Path) -> None:
    """A conversation's turns, then a transcription, then the conversation
    again: its history holds its own turns only."""
    engine = ScriptedEngine()
    seen: list[tuple[int, bool]] = []

    def brain(turn: TurnInput) -> str:
        seen.append((engine.submitted[-1][0].turns, turn.audio is not None))
        return SAID if turn.audio is not None else f"I had {engine.submitted[-1][0].turns} turns"

    engine.replies = brain
    pcm = recording(audio_dir / "ldc93s1-16k-mono.wav")
    async with wyoming_server(engine) as server:
        assert handled_text(await handle(server, "one", "01J000HIST")) == "I had 0 turns"
        transcript_of(await transcribe(server, pcm))
        transcript_of(await transcribe(server, pcm))
        assert handled_text(await handle(server, "two", "01J000HIST")) == "I had 1 turns"
    assert seen == [(0, False), (0, True), (0, True), (1, False)], seen
