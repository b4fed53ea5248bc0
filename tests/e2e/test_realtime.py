"""End to end: real server on loopback, real client, real audio, real engine.

The Qwen2-Audio engine runs the real classes on the tiny random model (its
replies are noise: the tests check what happens, never what is said). The
ScriptedEngine stands in where a reply must be long (barge-in) or carry a
per-session marker (20 concurrent clients); each of those paths also runs once
with the tiny model.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from voice_agent.audio import decode
from voice_agent.client import (
    EventPrinter,
    PcmAudio,
    RealtimeClient,
    load_pcm,
    pcm16_mono,
    run_client,
    stream_file,
    stream_pcm,
)
from voice_agent.config import Config
from voice_agent.engine.base import Engine, TurnInput
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import (
    ErrorEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)
from voice_agent.transports.websocket import running_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

# jfk.wav's speech edges, measured once from its 20 ms frame energy: the noise
# floor sits at -42 dB until "And" jumps to -28 dB at 320 ms; "country" ends at
# 10180 ms (-15 dB -> -28 dB), after which only crowd noise follows. With the
# 1 s of silence the test puts in front, the edges in the stream are:
JFK_SPEECH_MS = (1320, 11180)
# JFK pauses up to 1.16 s between phrases; a longer hangover keeps it one utterance.
JFK_HANGOVER_MS = 1250
# The file's last 0.2 s (from 10.8 s) is loud crowd noise (-24 dB) that webrtcvad
# calls speech: with the long hangover above it would stretch the utterance to
# the end of the file, so the test sends the first 10.8 s (all of the speech).
JFK_SECONDS = 10.8


@pytest.fixture
def config() -> Config:
    return Config(host="127.0.0.1", port=0, max_new_tokens=12)


def events_of(client: RealtimeClient) -> list[ServerEvent]:
    return [e for e in client.received if not isinstance(e, ReplyDelta)]


async def wait_done(client: RealtimeClient, n: int, timeout: float = 45.0) -> list[ReplyDone]:
    """Until `n` reply.done events arrived; fails on an error event."""
    async with asyncio.timeout(timeout):
        while len(client.of_type(ReplyDone)) < n:
            assert not client.of_type(ErrorEvent), client.of_type(ErrorEvent)
            await client.wait_for(ReplyDone | ErrorEvent)  # type: ignore[arg-type]
    assert not client.of_type(ErrorEvent), client.of_type(ErrorEvent)
    return client.of_type(ReplyDone)


# ---------------------------------------------------------- the tiny model


async def test_jfk_one_utterance_and_a_streamed_reply(
    config: Config, tiny_engine: Engine, audio_dir: Path
) -> None:
    cfg = replace(config, hangover_ms=JFK_HANGOVER_MS)
    async with (
        running_server(cfg, tiny_engine, close_engine=False) as server,
        RealtimeClient(server.url) as client,
    ):
        started = await client.start()
        assert started.model == tiny_engine.model_name
        jfk = decode(audio_dir / "jfk.wav")[: round(JFK_SECONDS * 16000)]
        await stream_pcm(client, pcm16_mono(jfk), 0, 1.0, 1.0)
        (done,) = await wait_done(client, 1)
        assert await client.wait_settled(30, quiet=0.3)
    stopped = client.of_type(SpeechStoppedEvent)
    assert len(stopped) == 1 and len(client.of_type(SpeechStartedEvent)) == 1
    start_ms, end_ms = JFK_SPEECH_MS
    assert abs(stopped[0].start_ms - start_ms) <= 150
    assert abs(stopped[0].end_ms - end_ms) <= 150
    (reply,) = client.of_type(ReplyStarted)
    assert reply.utterance_id == stopped[0].utterance_id
    deltas = [d for d in client.of_type(ReplyDelta) if d.reply_id == reply.reply_id]
    assert len(deltas) >= 1
    assert done.reply_id == reply.reply_id
    assert done.text == "".join(d.text for d in deltas)
    assert done.usage["prompt_tokens"] > 0 and 1 <= done.usage["completion_tokens"] <= 12
    assert set(done.timing) == {"queue_ms", "ttft_ms", "total_ms"}
    order = [type(e).__name__ for e in events_of(client)]
    assert order == [
        "SessionStarted",
        "SpeechStartedEvent",
        "SpeechStoppedEvent",
        "ReplyStarted",
        "ReplyDone",
    ]


async def test_three_clips_in_one_stream(
    config: Config, tiny_engine: Qwen2AudioEngine, audio_dir: Path
) -> None:
    names = [
        "ldc93s1-16k-mono.wav",
        "librispeech-1272-128104-0000.flac",
        "new-home-in-the-stars-16k.wav",
    ]
    gap = np.zeros(24000, dtype=np.float32)  # 1.5 s
    parts: list[np.ndarray] = [gap]
    for name in names:
        parts += [decode(audio_dir / name), gap]
    stream = pcm16_mono(np.concatenate(parts))
    # Three separate requests 1.5 s apart, answered in order. Within the
    # default continue window the next would join the one before, and on a
    # loaded machine a reply may outlast the gap and the next clip would barge
    # in (tested on its own below): both off, so the outcome does not depend on
    # the machine's speed.
    separate = replace(config, continue_window_ms=0, barge_in_ms=0)
    async with (
        running_server(separate, tiny_engine, close_engine=False) as server,
        RealtimeClient(server.url) as client,
    ):
        sid = (await client.start()).session_id
        await stream_pcm(client, stream, speed=1.0, silence_after=0.5)
        done = await wait_done(client, 3)
        history = tiny_engine.history_text(server.sessions[sid].conversation)
    stopped = client.of_type(SpeechStoppedEvent)
    assert [s.utterance_id for s in stopped] == ["u1", "u2", "u3"]
    started = client.of_type(ReplyStarted)
    assert [(r.reply_id, r.utterance_id) for r in started] == [
        ("r1", "u1"),
        ("r2", "u2"),
        ("r3", "u3"),
    ]
    assert [d.reply_id for d in done] == ["r1", "r2", "r3"]
    for label in ("Audio 1", "Audio 2", "Audio 3"):
        assert history.count(label) == 1
    assert "Audio 4" not in history


async def test_concurrent_clients_on_the_tiny_model(
    config: Config, tiny_engine: Qwen2AudioEngine, audio_dir: Path
) -> None:
    names = [
        "ldc93s1-16k-mono.wav",
        "new-home-in-the-stars-16k.wav",
        "librispeech-1272-128104-0000.flac",
        "ldc93s1-16k-mono.wav",
    ]
    async with running_server(config, tiny_engine, close_engine=False) as server:

        async def one(name: str) -> tuple[RealtimeClient, str]:
            async with RealtimeClient(server.url) as client:
                sid = (await client.start()).session_id
                await stream_pcm(client, load_pcm(audio_dir / name), 0, 0.5, 1.0)
                await wait_done(client, 1)
                return client, tiny_engine.history_text(server.sessions[sid].conversation)

        results = await asyncio.gather(*(one(n) for n in names))
    for client, history in results:
        (done,) = client.of_type(ReplyDone)
        (stopped,) = client.of_type(SpeechStoppedEvent)
        assert client.of_type(ReplyStarted)[0].utterance_id == stopped.utterance_id
        assert history.count("Audio 1") == 1 and "Audio 2" not in history
        assert history.count("<|im_start|>assistant") == 1
        # this session's own reply, and only it, is in its conversation
        assert (done.text == "") or done.text.strip() in history


# --------------------------------------------------------------- barge-in


async def test_barge_in_cancels_the_reply_and_answers_the_new_speech(
    config: Config, audio_dir: Path
) -> None:
    """Sent at real-time pace: the first reply streams 60 words over ~6 s while
    the user starts talking again 1.5 s after the first sentence."""
    long_reply = " ".join(f"word{i}" for i in range(60))
    engine = ScriptedEngine([long_reply, "short answer"], token_delay=0.1)
    first = decode(audio_dir / "ldc93s1-16k-mono.wav")
    second = decode(audio_dir / "new-home-in-the-stars-16k.wav")
    gap = np.zeros(24000, dtype=np.float32)
    stream = pcm16_mono(np.concatenate([gap[:8000], first, gap, second]))
    async with (
        # a new request 1.5 s after the first: a barge-in, not a continuation
        running_server(replace(config, max_new_tokens=256, continue_window_ms=0), engine) as server,
        RealtimeClient(server.url) as client,
    ):
        await client.start()
        await stream_pcm(client, stream, speed=1.0, silence_after=1.0)
        (done,) = await wait_done(client, 1)
        metrics = server.metrics
    (cancelled,) = client.of_type(ReplyCancelled)
    assert cancelled.reason == "barge_in" and cancelled.reply_id == "r1"
    sent = "".join(d.text for d in client.of_type(ReplyDelta) if d.reply_id == "r1")
    assert sent and cancelled.text == sent and long_reply.startswith(sent)
    assert sent != long_reply
    assert done.reply_id == "r2" and done.text == "short answer"
    order = [
        (type(e).__name__, getattr(e, "utterance_id", None) or getattr(e, "reply_id", None))
        for e in events_of(client)
    ]
    assert order == [
        ("SessionStarted", None),
        ("SpeechStartedEvent", "u1"),
        ("SpeechStoppedEvent", "u1"),
        ("ReplyStarted", "u1"),
        ("SpeechStartedEvent", "u2"),
        ("ReplyCancelled", "r1"),
        ("SpeechStoppedEvent", "u2"),
        ("ReplyStarted", "u2"),
        ("ReplyDone", "r2"),
    ]
    assert metrics.barge_ins_total == 1
    # the history keeps only what was sent of the cancelled reply
    conversation, _ = engine.submitted[0]
    history = engine.history_text(conversation)
    assert sent in history and long_reply not in history


# ------------------------------------------------------ rates and channels


async def test_input_rates_and_channels_give_the_same_boundaries(
    config: Config, audio_dir: Path
) -> None:
    engine = ScriptedEngine(["ok"], token_delay=0.001)
    bounds: dict[str, tuple[int, int]] = {}
    async with running_server(config, engine) as server:
        for name in ("ldc93s1-16k-mono.wav", "ldc93s1-8k-mono.wav", "ldc93s1-44k-stereo.wav"):
            audio = load_pcm(audio_dir / name, raw=True)
            async with RealtimeClient(server.url) as client:
                started = await client.start(audio.sample_rate, audio.channels)
                assert started.sample_rate == audio.sample_rate
                await stream_pcm(client, audio, 0, 1.0, 1.5)
                await wait_done(client, 1)
            (stopped,) = client.of_type(SpeechStoppedEvent)
            bounds[name] = (stopped.start_ms, stopped.end_ms)
    ref_start, ref_end = bounds["ldc93s1-16k-mono.wav"]
    assert 1000 <= ref_start < ref_end <= 1000 + 2925
    for name in ("ldc93s1-8k-mono.wav", "ldc93s1-44k-stereo.wav"):
        start, end = bounds[name]
        assert abs(start - ref_start) <= 30, bounds
        assert abs(end - ref_end) <= 30, bounds


# -------------------------------------------------- 20 concurrent clients


def peak_marker(turn: TurnInput) -> str:
    """The reply names its input: the text, or the audio's peak PCM16 value
    (each client sends its clip at its own gain)."""
    if turn.audio is not None:
        return f"peak {round(float(np.max(np.abs(turn.audio))) * 32768)}"
    return f"text {turn.text}"


async def test_twenty_concurrent_clients_get_their_own_replies(
    config: Config, audio_dir: Path
) -> None:
    clip = decode(audio_dir / "ldc93s1-16k-mono.wav")
    engine = ScriptedEngine(peak_marker, token_delay=0.002)

    async def one(i: int, url: str) -> None:
        gain = 0.4 + 0.025 * i
        audio = pcm16_mono(clip * gain / float(np.max(np.abs(clip))))
        peak = int(np.max(np.abs(np.frombuffer(audio.pcm, dtype="<i2").astype(np.int32))))
        async with RealtimeClient(url) as client:
            await client.start(device=f"speaker-{i}")
            await client.send_text(f"c{i} first")
            await stream_pcm(client, audio, 0, 0.5, 1.0)
            await client.send_text(f"c{i} last")
            done = await wait_done(client, 3)
        assert [d.text for d in done] == [f"text c{i} first", f"peak {peak}", f"text c{i} last"]
        assert [d.reply_id for d in done] == ["r1", "r2", "r3"]
        started = client.of_type(ReplyStarted)
        assert [r.utterance_id for r in started] == [None, "u1", None]
        for d in done:  # every delta belongs to a reply of this session, in order
            pieces = [x.text for x in client.of_type(ReplyDelta) if x.reply_id == d.reply_id]
            assert "".join(pieces) == d.text

    # faster than real time: no barge-in, or the clip would interrupt the text reply
    async with running_server(replace(config, barge_in_ms=0), engine) as server:
        await asyncio.gather(*(one(i, server.url) for i in range(20)))
        assert server.metrics.sessions_total == 20
    conversations = {id(c) for c, _ in engine.submitted}
    assert len(conversations) == 20 and len(engine.submitted) == 60


def test_pcm_audio_framing() -> None:
    audio = PcmAudio(bytes(44100 * 4), 44100, 2)
    assert audio.frame_bytes == 882 * 4
    assert audio.duration_s == pytest.approx(1.0)
    assert len(audio.silence(0.5)) == 22050 * 4


# ------------------------------------------------------- the reference client


async def test_stream_file_and_run_client_print_the_events(config: Config, audio_dir: Path) -> None:
    engine = ScriptedEngine(["hello from the server"], token_delay=0.001)
    async with running_server(config, engine) as server:
        out = io.StringIO()
        events = await stream_file(
            server.url,
            audio_dir / "ldc93s1-8k-mono.wav",
            speed=0,
            silence_before=0.5,
            on_event=EventPrinter(out),
            raw=True,
            device="kitchen",
        )
        assert [type(e).__name__ for e in events if not isinstance(e, ReplyDelta)] == [
            "SessionStarted",
            "SpeechStartedEvent",
            "SpeechStoppedEvent",
            "ReplyStarted",
            "ReplyDone",
        ]
        lines = out.getvalue().splitlines()
        assert lines[0].startswith("session.started ")
        assert "reply r1: hello from the server" in lines  # deltas inline on one line
        assert lines[-1].startswith("reply.done r1 ")

        out = io.StringIO()
        path = str(audio_dir / "new-home-in-the-stars-16k.wav")
        assert await run_client(server.url, path, speed=0, out=out) == 0
        assert "reply r1: hello from the server" in out.getvalue().splitlines()
    assert await run_client(server.url, path, speed=0, out=io.StringIO()) == 1  # server gone
