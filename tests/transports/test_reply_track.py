"""The WebRTC reply track on its own: no peer connection, no browser. A fake
clock and sleep stand in for time, so pacing is checked without waiting."""

from __future__ import annotations

import asyncio
import fractions

import av
import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from tests.helpers.clocks import FakeClock
from voice_agent.transports.reply_track import TRACK_RATE, ReplyTrack

pytestmark = pytest.mark.timeout(30)

FRAME = TRACK_RATE // 50  # 20 ms


def make_track(t: FakeClock, **kwargs: float) -> ReplyTrack:
    return ReplyTrack(clock=t.clock, sleep=t.sleep, **kwargs)  # type: ignore[arg-type]


def tone(rate: int, seconds: float, hz: float = 440.0, level: float = 0.5) -> bytes:
    n = round(rate * seconds)
    x = level * np.sin(2 * np.pi * hz * np.arange(n) / rate)
    return (x * 32767).astype("<i2").tobytes()


def samples(frame: av.AudioFrame) -> np.ndarray:
    return frame.to_ndarray().reshape(-1).astype(np.int16)


async def pull(track: ReplyTrack, n: int) -> list[av.AudioFrame]:
    return [await track.recv() for _ in range(n)]


async def test_frames_are_20_ms_of_48k_mono_with_rising_timestamps() -> None:
    t = FakeClock()
    track = make_track(t)
    frames = await pull(track, 10)
    for i, frame in enumerate(frames):
        assert frame.samples == FRAME
        assert frame.sample_rate == TRACK_RATE
        assert frame.format.name == "s16" and frame.layout.name == "mono"
        assert frame.time_base == fractions.Fraction(1, TRACK_RATE)
        assert frame.pts == i * FRAME
        assert not samples(frame).any()  # nothing written: silence keeps the track live
    assert track.frames_sent == 10 and track.audio_frames_sent == 0


async def test_recv_is_paced_in_real_time() -> None:
    t = FakeClock()
    track = make_track(t)
    start = t.now
    await pull(track, 51)
    # frame n is due at start + n * 20 ms: one second for 50 frames after the first
    assert t.now == pytest.approx(start + 1.0)
    assert len(t.sleeps) == 50 and all(s == pytest.approx(0.02) for s in t.sleeps)
    # time spent elsewhere counts: 10 ms later the next frame is 10 ms away
    t.now += 0.01
    t.sleeps.clear()
    await track.recv()
    assert t.sleeps == [pytest.approx(0.01)]
    # far behind (a stalled loop), no burst to catch up: the pacing starts afresh
    t.now += 5.0
    t.sleeps.clear()
    frame = await track.recv()
    assert t.sleeps == []
    assert frame.pts == 52 * FRAME  # timestamps keep counting frames
    await track.recv()
    assert t.sleeps == [pytest.approx(0.02)]  # and then back to 20 ms steps


class HeldTime(FakeClock):
    """FakeClock whose sleeps, once `hold` is set, wait until it fires: the
    test acts while recv() waits for its frame's time."""

    hold: asyncio.Event | None = None

    async def sleep(self, seconds: float) -> None:
        if self.hold is not None:
            await self.hold.wait()
        await super().sleep(seconds)


async def test_a_reply_starts_in_the_frame_being_waited_for() -> None:
    # The latency the track may add to a reply's first sound is the wait for
    # the next 20 ms frame boundary, no more: silence is made when it is due,
    # never queued ahead of the reply, and audio written while recv() waits
    # for a frame's time goes out in that very frame.
    t = HeldTime()
    track = make_track(t)
    idle = await pull(track, 10)  # 200 ms of silence between replies
    assert not any(samples(f).any() for f in idle)
    assert track.buffered_ms == 0  # nothing made ahead
    t.hold = asyncio.Event()
    waiting = asyncio.create_task(track.recv())
    await asyncio.sleep(0)
    assert not waiting.done() and t.sleeps[-1] == pytest.approx(0.02)
    await track.write(tone(22050, 0.04), 22050)  # Piper's first 40 ms chunk, mid-wait
    t.hold.set()
    frame = await asyncio.wait_for(waiting, 5)
    assert frame.pts == 10 * FRAME  # the very next frame...
    assert np.abs(samples(frame)[:48]).max() > 1000  # ...from its first ms (resampler: ~0)
    assert np.abs(samples(await track.recv())).max() > 1000  # and the chunk goes on
    assert track.audio_frames_sent == 2


async def test_written_audio_is_resampled_and_comes_out_in_order() -> None:
    t = FakeClock()
    track = make_track(t)
    pcm = tone(16000, 0.4)  # 400 ms at 16 kHz, written in 40 ms chunks as the speaker does
    for i in range(0, len(pcm), 1280):
        await track.write(pcm[i : i + 1280], 16000)
    track.flush()  # the end of the reply: the resampler's last samples too
    assert track.buffered_ms == pytest.approx(400, abs=2)
    out = np.concatenate([samples(f) for f in await pull(track, 25)])
    voiced = np.flatnonzero(np.abs(out) > 1000)
    # 400 ms of tone at 48 kHz, then silence
    assert len(out[voiced[0] : voiced[-1] + 1]) == pytest.approx(0.4 * TRACK_RATE, abs=200)
    assert not out[voiced[-1] + 200 :].any()
    spectrum = np.abs(np.fft.rfft(out[voiced[0] : voiced[-1]].astype(np.float64)))
    peak_hz = np.argmax(spectrum) * TRACK_RATE / (voiced[-1] - voiced[0])
    assert peak_hz == pytest.approx(440, abs=5)  # the same tone: the rate was converted
    assert track.audio_frames_sent == 20


async def test_48k_audio_passes_unchanged() -> None:
    track = make_track(FakeClock())
    pcm = tone(TRACK_RATE, 0.04)
    await track.write(pcm, TRACK_RATE)
    frames = await pull(track, 3)
    assert b"".join(samples(f).tobytes() for f in frames[:2]) == pcm
    assert not samples(frames[2]).any()


async def test_clear_drops_the_buffered_audio_at_once() -> None:
    t = FakeClock()
    track = make_track(t)
    await track.write(tone(16000, 0.5), 16000)
    first = await track.recv()
    assert np.abs(samples(first)).max() > 1000
    assert track.buffered_ms > 400
    assert track.clear() > 400  # a cancel
    assert track.buffered_ms == 0 and track.cleared_ms > 400
    after = await pull(track, 5)
    assert not any(samples(f).any() for f in after)  # the very next frame is silence
    assert track.audio_frames_sent == 1
    # the next reply plays normally
    await track.write(tone(16000, 0.1), 16000)
    track.flush()
    assert np.abs(samples(await track.recv())).max() > 1000


async def test_the_buffer_is_bounded_and_a_writer_waits_for_room() -> None:
    t = FakeClock()
    track = make_track(t, max_buffered_ms=200)
    chunk = tone(TRACK_RATE, 0.1)
    await track.write(chunk, TRACK_RATE)
    await track.write(chunk, TRACK_RATE)  # 200 ms: full
    writer = asyncio.create_task(track.write(chunk, TRACK_RATE))
    await asyncio.sleep(0.01)
    assert not writer.done() and track.buffered_ms == 200  # waits, nothing dropped
    await track.recv()  # room for it once a frame went out
    await asyncio.wait_for(writer, 5)
    assert track.buffered_ms == 280
    assert track.dropped_ms == 0


async def test_a_writer_waiting_for_room_drops_its_chunk_on_clear() -> None:
    t = FakeClock()
    track = make_track(t, max_buffered_ms=100)
    await track.write(tone(TRACK_RATE, 0.1), TRACK_RATE)
    writer = asyncio.create_task(track.write(tone(TRACK_RATE, 0.1), TRACK_RATE))
    await asyncio.sleep(0.01)
    assert not writer.done()
    track.clear()
    await asyncio.wait_for(writer, 5)
    assert track.buffered_ms == 0  # the cancelled reply's waiting chunk was not added
    assert not any(samples(f).any() for f in await pull(track, 3))


async def test_a_track_nobody_drains_drops_instead_of_blocking() -> None:
    track = ReplyTrack(max_buffered_ms=100, stall_seconds=0.05)  # real time, briefly
    await track.write(tone(TRACK_RATE, 0.1), TRACK_RATE)
    await asyncio.wait_for(track.write(tone(TRACK_RATE, 0.1), TRACK_RATE), 5)
    assert track.dropped_ms == 100
    assert track.buffered_ms == 100


async def test_a_stopped_track_ends_and_takes_no_audio() -> None:
    track = make_track(FakeClock(), max_buffered_ms=100)
    await track.write(tone(TRACK_RATE, 0.1), TRACK_RATE)
    writer = asyncio.create_task(track.write(tone(TRACK_RATE, 0.1), TRACK_RATE))
    await asyncio.sleep(0.01)
    track.stop()
    await asyncio.wait_for(writer, 5)  # a waiting writer returns
    assert track.readyState == "ended" and track.buffered_ms == 0
    await track.write(tone(TRACK_RATE, 0.1), TRACK_RATE)
    assert track.buffered_ms == 0
    with pytest.raises(MediaStreamError):
        await track.recv()
