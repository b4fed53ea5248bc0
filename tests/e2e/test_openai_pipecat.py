"""Pipecat's OpenAIRealtimeLLMService (pipecat-ai, not written here) pointed
at a real voice_agent server on loopback: a minimal pipeline (no audio
devices) of the service between two recorders, driven with Pipecat's own
frames: a context with a user message (text), and microphone frames of a
real recording (voice, the server's VAD ends the turn).

The tiny random Qwen2-Audio answers (noise: only frames and their kinds are
checked); the scripted engine + Piper where the audio must be speech.
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
from pipecat.frames.frames import (
    EndFrame,
    ErrorFrame,
    Frame,
    InputAudioRawFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    TTSAudioRawFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.openai.realtime.events import (
    SessionProperties,
)
from pipecat.services.openai.realtime.llm import OpenAIRealtimeLLMService
from pipecat.workers.runner import WorkerRunner

from tests.e2e.openai_support import KEY, MODEL, openai_server
from tests.helpers.speech import voiced_fraction
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import WebSocketServerApp
from voice_agent.tts.speaker import Speech

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WAIT = 90.0
REPLY = "Sure, the kitchen light is on now. Anything else I can do for you this evening?"


class Recorder(FrameProcessor):
    """Keeps the frames that pass one way (and passes them on)."""

    def __init__(self, direction: FrameDirection) -> None:
        super().__init__()
        self.direction = direction
        self.frames: list[Frame] = []
        self.changed = asyncio.Event()

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if direction == self.direction:
            self.frames.append(frame)
            self.changed.set()
        await self.push_frame(frame, direction)

    def of(self, kind: type[Frame]) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]


class Run:
    """A running pipeline: upstream recorder, the service, downstream recorder."""

    def __init__(self, worker: PipelineWorker, up: Recorder, down: Recorder) -> None:
        self.worker, self.up, self.down = worker, up, down

    async def queue(self, frame: Frame) -> None:
        await self.worker.queue_frame(frame)

    async def until(self, kind: type[Frame], n: int = 1, timeout: float = WAIT) -> None:
        """Until `n` frames of `kind` came downstream; fails on an ErrorFrame."""
        async with asyncio.timeout(timeout):
            while len(self.down.of(kind)) < n:
                errors = self.up.of(ErrorFrame) + self.down.of(ErrorFrame)
                assert not errors, [e.error for e in errors]
                self.down.changed.clear()
                self.up.changed.clear()
                await asyncio.wait(
                    [
                        asyncio.ensure_future(self.down.changed.wait()),
                        asyncio.ensure_future(self.up.changed.wait()),
                    ],
                    return_when=asyncio.FIRST_COMPLETED,
                )


@asynccontextmanager
async def pipeline(
    app: WebSocketServerApp, session: SessionProperties, instruction: str | None = None
) -> AsyncIterator[Run]:
    """OpenAIRealtimeLLMService at ws://127.0.0.1:PORT/v1/realtime (it adds
    ?model=qwen2-audio and the Bearer key), in a pipeline that ends on exit."""
    service = OpenAIRealtimeLLMService(
        api_key=KEY,
        base_url=f"ws://127.0.0.1:{app.port}/v1/realtime",
        settings=OpenAIRealtimeLLMService.Settings(
            model=MODEL, session_properties=session, system_instruction=instruction
        ),
    )
    up, down = Recorder(FrameDirection.UPSTREAM), Recorder(FrameDirection.DOWNSTREAM)
    worker = PipelineWorker(Pipeline([up, service, down]), cancel_on_idle_timeout=False)
    started = asyncio.Event()

    @worker.event_handler("on_pipeline_started")  # type: ignore[untyped-decorator]
    async def _started(worker: PipelineWorker, frame: Frame) -> None:
        started.set()

    runner = WorkerRunner(handle_sigint=False)
    await runner.add_workers(worker)
    task = asyncio.create_task(runner.run())
    try:
        async with asyncio.timeout(30):
            await started.wait()
        yield Run(worker, up, down)
        await worker.queue_frame(EndFrame())
        async with asyncio.timeout(30):
            await task
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


async def test_pipecat_completes_a_text_response(tiny_engine: Qwen2AudioEngine) -> None:
    async with openai_server(tiny_engine) as app:
        session = SessionProperties(output_modalities=["text"])
        async with pipeline(app, session) as run:
            context = LLMContext(messages=[{"role": "user", "content": "Hello there!"}])
            await run.queue(LLMContextFrame(context=context))
            await run.until(LLMFullResponseEndFrame)
            await asyncio.sleep(0.5)  # nothing else (an error) trails the response
            assert not run.up.of(ErrorFrame) and not run.down.of(ErrorFrame)
    assert run.down.of(LLMFullResponseStartFrame)


def microphone(audio_dir: Path) -> bytes:
    """A recording as a microphone gives it: 16 kHz PCM16, silence around it."""
    data, rate = soundfile.read(str(audio_dir / "ldc93s1-16k-mono.wav"), dtype="int16")
    assert rate == 16000
    pcm = np.concatenate([np.zeros(8000, np.int16), data, np.zeros(32000, np.int16)])
    return pcm.astype("<i2").tobytes()


async def speak(run: Run, pcm: bytes) -> None:
    """InputAudioRawFrames of 20 ms at 2x real time (Pipecat resamples to 24 kHz)."""
    step = 640  # 20 ms at 16 kHz
    for i in range(0, len(pcm), step):
        await run.queue(
            InputAudioRawFrame(audio=pcm[i : i + step], sample_rate=16000, num_channels=1)
        )
        await asyncio.sleep(0.01)


async def test_pipecat_hears_the_microphone_and_speaks(piper: Speech, audio_dir: Path) -> None:
    """Microphone frames of a real recording then silence: the server's VAD
    ends the turn, the reply comes back as TTSAudioRawFrames with speech."""
    engine = ScriptedEngine([REPLY], token_delay=0.01)
    async with openai_server(engine, speech=piper, max_new_tokens=1000) as app:
        session = SessionProperties(output_modalities=["audio"])
        async with pipeline(app, session) as run:
            context = LLMContext(messages=[{"role": "user", "content": "Hello!"}])
            await run.queue(LLMContextFrame(context=context))
            await run.until(LLMFullResponseEndFrame)  # the context's own response
            await speak(run, microphone(audio_dir))
            await run.until(LLMFullResponseEndFrame, 2)
    audio = run.down.of(TTSAudioRawFrame)
    assert audio and {f.sample_rate for f in audio} == {24000}
    spoken = b"".join(f.audio for f in audio)
    assert voiced_fraction(spoken, 24000) > 0.4


async def test_pipecat_barge_in(piper: Speech, audio_dir: Path) -> None:
    """The user talks over a long spoken answer: Pipecat truncates the
    answer's item at what it received (conversation.item.truncate), the
    server cancels the answer and answers the speech; no error ever (every
    error but two is fatal to Pipecat)."""
    long = " ".join(f"This is sentence number {n} of a very long answer." for n in range(60))
    engine = ScriptedEngine([long, REPLY], token_delay=0.05)
    async with openai_server(engine, speech=piper, max_new_tokens=1000) as app:
        session = SessionProperties(output_modalities=["audio"])
        async with pipeline(app, session) as run:
            context = LLMContext(messages=[{"role": "user", "content": "Talk to me."}])
            await run.queue(LLMContextFrame(context=context))
            await run.until(TTSAudioRawFrame, 5)  # the long answer is playing
            await speak(run, microphone(audio_dir))
            await run.until(LLMFullResponseEndFrame, 2)
            await asyncio.sleep(0.5)
            assert not run.up.of(ErrorFrame) and not run.down.of(ErrorFrame)
        # the server's own count: one utterance, both turns over (the first cut by
        # Pipecat's truncate at speech_started or by the server's barge-in)
        assert app.metrics.utterances_total == 1
        assert app.metrics.turns_total == 2
        assert app.metrics.errors_total == 0
    spoken_s = sum(len(f.audio) for f in run.down.of(TTSAudioRawFrame)) / 2 / 24000
    assert spoken_s < 30  # the long answer (over a minute) was cut short


async def test_pipecat_bot_speaks_first(tiny_engine: Qwen2AudioEngine) -> None:
    """A system instruction and an empty context (the bot greets the user
    first): Pipecat sends response.create with no user input at all."""
    async with openai_server(tiny_engine) as app:
        session = SessionProperties(output_modalities=["text"])
        async with pipeline(app, session, instruction="Greet the user.") as run:
            context = LLMContext()
            await run.queue(LLMContextFrame(context=context))
            await run.until(LLMFullResponseEndFrame)
            await asyncio.sleep(0.5)
            assert not run.up.of(ErrorFrame) and not run.down.of(ErrorFrame)
