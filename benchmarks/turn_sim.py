"""One case of benchmarks/turns.py through the server's own code, in simulated time.

What runs for real: the Session (VAD, turns, barge-in, continuation) inside
the LiveSession driver, the ScriptedEngine, and a ReplySpeaker that speaks
with Piper, wired the way the WebSocket transport wires them (every event
goes to the speaker first; its playback reports go to the LiveSession, and
the LiveSession's stop_audio stops it).

What is simulated: time. The asyncio loop (VirtualLoop) keeps a virtual
clock that jumps to the next timer whenever nothing is ready, so a case's
audio is fed in 20 ms frames at "real time" (frame i at (i + 1) * 20 ms, the
moment a microphone would have delivered it) while the whole case takes a
few milliseconds of CPU. Work that runs in a thread in the server (Piper's
synthesis, the end-of-turn model) runs inline and is charged to the virtual
clock at its measured CPU time (the process's, all threads: what it takes
on idle cores, whatever else this shared machine runs meanwhile): Piper per
piece of text (the median of three runs after a warm-up, one thread,
resampling included, measured once and cached), the model at the median of
one call on an 8 s clip. The engine's 10 ms a token is its own (virtual)
sleep, as in benchmarks/voice.py. The client plays each audio frame as it
arrives and drops what it holds when a reply is cancelled or its audio is
stopped; the user's microphone hears only the user (echo cancelled).
"""

from __future__ import annotations

import asyncio
import hashlib
import selectors
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.turn_cases import RATE, Case, samples
from voice_agent.audio import float_to_pcm16
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.live import LiveSession
from voice_agent.protocol import ServerEvent
from voice_agent.session import HistoryEntry, SessionConfig
from voice_agent.tts import TextToSpeech
from voice_agent.tts.speaker import ReplySpeaker, Speech

CHUNK_MS = 20
REPLY = "Sure, the kitchen light is on now. Anything else I can do for you?"  # voice.py's
TOKEN_S = 0.01  # the scripted engine: 100 tokens (words) a second, as in voice.py
SETTLE_MAX_S = 20.0  # room tone fed after the case at most, until the reply has played


class Meter:
    """Virtual seconds charged by the work of one run_in_executor call."""

    def __init__(self) -> None:
        self.charged = 0.0


class Stalled(RuntimeError):
    """Nothing ready and nothing scheduled: the simulation would wait forever."""


class _VirtualSelector(selectors.BaseSelector):
    """A real selector (the loop's self-pipe) that never waits: a timeout
    moves the virtual clock instead."""

    def __init__(self) -> None:
        self._real = selectors.DefaultSelector()
        self.now = 0.0

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = self._real.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:
            raise Stalled("no timer and nothing ready")
        self.now += timeout
        return []

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module doc). run_in_executor
    runs the function at once and resolves its future after the virtual
    seconds the function charged to `meter`."""

    def __init__(self, meter: Meter) -> None:
        self._virtual = _VirtualSelector()
        super().__init__(self._virtual)
        self.meter = meter

    def time(self) -> float:
        return self._virtual.now

    def run_in_executor(  # type: ignore[override]
        self, executor: Executor | None, func: Callable[..., Any], *args: Any
    ) -> asyncio.Future[Any]:
        self.meter.charged = 0.0
        fut: asyncio.Future[Any] = self.create_future()
        try:
            result = func(*args)
        except Exception as exc:
            self.call_later(self.meter.charged, _settle, fut, None, exc)
        else:
            self.call_later(self.meter.charged, _settle, fut, result, None)
        return fut


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.cancelled():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class CachedSpeech(Speech):
    """Speech whose pieces are synthesized once, their cost measured (median
    of three runs) and charged to the meter at every use."""

    def __init__(self, tts: TextToSpeech, meter: Meter) -> None:
        super().__init__(tts)
        self.meter = meter
        self.pieces: dict[tuple[str, int], tuple[np.ndarray, float]] = {}
        # warm up as the server does at start: lazy parts are not charged
        super().synthesize_now("Hello, I am ready.", 16000)

    def synthesize_now(self, text: str, sample_rate: int) -> np.ndarray:
        key = (text, sample_rate)
        if key not in self.pieces:
            times, audio = [], np.zeros(0, np.float32)
            for _ in range(3):
                t = time.process_time()
                audio = super().synthesize_now(text, sample_rate)
                times.append(time.process_time() - t)
            self.pieces[key] = (audio, statistics.median(times))
        audio, cost = self.pieces[key]
        self.meter.charged += cost
        return audio

    def costs_ms(self) -> dict[str, float]:
        return {text: round(cost * 1000, 1) for (text, _), (_, cost) in self.pieces.items()}


class CachedDetector:
    """An end-of-turn detector answering each clip once (the same audio gets
    the same answer), every call charged `call_s` to the meter."""

    def __init__(self, detector: Any, meter: Meter, call_s: float) -> None:
        self.detector = detector
        self.name = getattr(detector, "name", "model")
        self.meter = meter
        self.call_s = call_s
        self.cache: dict[bytes, float] = {}
        self.calls = 0

    def predict(self, clips: Sequence[np.ndarray]) -> list[float]:
        keys = [hashlib.sha1(np.ascontiguousarray(c).tobytes()).digest() for c in clips]
        todo = [(k, c) for k, c in zip(keys, clips, strict=True) if k not in self.cache]
        if todo:
            probs = self.detector.predict([c for _, c in todo])
            self.calls += 1
            self.cache.update((k, float(p)) for (k, _), p in zip(todo, probs, strict=True))
        self.meter.charged += self.call_s
        return [self.cache[k] for k in keys]


@dataclass
class Run:
    """What one case produced: every event sent with its time, every audio
    frame sent (time, reply id, samples), the Session's and the engine's
    history at the end. Times in ms from the first audio sample."""

    events: list[tuple[float, ServerEvent]] = field(default_factory=list)
    frames: list[tuple[float, str, int]] = field(default_factory=list)
    history: list[HistoryEntry] = field(default_factory=list)
    engine_user_turns: int = 0
    end_ms: float = 0.0


def simulate(case: Case, config: SessionConfig, speech: Speech, meter: Meter) -> Run:
    """The case through LiveSession + ReplySpeaker on a fresh VirtualLoop."""
    loop = VirtualLoop(meter)
    try:
        return loop.run_until_complete(_run(case, config, speech))
    finally:
        loop.close()


async def _run(case: Case, config: SessionConfig, speech: Speech) -> Run:
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    run = Run()

    def now_ms() -> float:
        return (loop.time() - t0) * 1000.0

    engine = ScriptedEngine([REPLY], token_delay=TOKEN_S, clock=loop.time)
    await engine.start()
    speaker: ReplySpeaker | None = None

    async def send(event: ServerEvent) -> None:
        run.events.append((now_ms(), event))
        if speaker is not None:
            speaker.observe(event)  # as the WebSocket connection does

    async def send_audio(pcm: bytes) -> None:
        assert speaker is not None and speaker.reply_id is not None
        run.frames.append((now_ms(), speaker.reply_id, len(pcm) // 2))

    live = LiveSession(engine, send, session_id="bench", config=config)
    speaker = ReplySpeaker(
        speech, RATE, send, send_audio, on_playback=live.playback, clock=loop.time
    )
    live.stop_audio = speaker.stop
    pcm = float_to_pcm16(case.audio)
    tone = float_to_pcm16(case.audio[-samples(2000) :])  # the case's tail is room tone
    chunk = samples(CHUNK_MS) * 2
    frame = 0

    async def feed(data: bytes) -> None:
        nonlocal frame
        for i in range(0, len(data) - chunk + 1, chunk):
            frame += 1
            await asyncio.sleep(max(0.0, t0 + frame * CHUNK_MS / 1000 - loop.time()))
            await live.feed_audio(data[i : i + chunk])

    try:
        await feed(pcm)
        s = live.session
        while now_ms() < len(case.audio) * 1000 / RATE + SETTLE_MAX_S * 1000:
            if s.state == "idle" and not s.queued and not speaker.speaking:
                break
            await feed(tone[: chunk * 10])
        run.end_ms = now_ms()
        run.history = list(live.session.history)
        snap = engine.snapshot(live.conversation)
        msgs = [] if snap is None else snap.messages
        run.engine_user_turns = sum(m.get("role") == "user" for m in msgs)
    finally:
        await speaker.close()
        await live.close()
        await engine.close()
    return run
