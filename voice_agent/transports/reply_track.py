"""The WebRTC track that carries spoken replies back to the client (aiortc).

`ReplyTrack` is an outgoing audio MediaStreamTrack: aiortc's RTP sender calls
`recv()` in a loop and gets one 20 ms frame of PCM16 mono at 48 kHz (Opus's
own rate, so aiortc's encoder only duplicates the channel) per call, paced in
real time: frame n is due at start + n * 20 ms, and `recv()` sleeps until
then. When nothing is being spoken a frame is silence, so the track stays
live and the browser's jitter buffer and echo canceller keep running.
Silence is made when its frame is due, never queued ahead: a frame's content
is taken after its wait, so a reply's first samples go out in the next frame
(at most 20 ms after `write`, 10 ms on average; benchmarks/voice.py).

The speaker's PCM (any rate) goes in with `write(pcm, sample_rate)`: av's
stateful resampler converts it to 48 kHz (no clicks between chunks) and it
joins a buffer that `recv()` drains. Bounds: `write` waits while the buffer
holds `max_buffered_ms` (default 1 s) or more, so the speaker runs at most
that far ahead of what is played and its `speaking` state stays close to what
the listener hears. When nobody drains the track (the peer connection has not
connected, or has died) a write gives up after `stall_seconds` and drops its
chunk (counted in `dropped_ms`, logged once) rather than hold the reply up for ever.

`clear()` (a cancelled reply: barge-in, the client's `cancel`) drops the
buffered audio and the resampler's state at once, and a write that was
waiting for room drops its chunk, so the next frame is silence: only what the
RTP sender already encoded (one frame) and the network hold is still heard.
`flush()` (the end of a reply) pushes the resampler's last samples out.

Times come from an injected clock and sleep (tests run without waiting).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import time
from collections.abc import Awaitable, Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

logger = logging.getLogger("voice_agent.transports.webrtc")

TRACK_RATE = 48000  # Opus's rate: aiortc's encoder does not resample it
FRAME_MS = 20
MAX_BUFFERED_MS = 1000
STALL_SECONDS = 2.0  # a write waits this long for a track nobody drains
LATE_RESET_SECONDS = 0.2  # further behind than this, the pacing starts afresh


class ReplyTrack(MediaStreamTrack):
    """Spoken replies as a paced 48 kHz mono audio track; see the module doc."""

    kind = "audio"

    def __init__(
        self,
        *,
        max_buffered_ms: int = MAX_BUFFERED_MS,
        stall_seconds: float = STALL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        session_id: str = "",
    ) -> None:
        super().__init__()
        self.sample_rate = TRACK_RATE
        self.frame_samples = TRACK_RATE * FRAME_MS // 1000
        self.frame_bytes = 2 * self.frame_samples
        self.max_buffered_bytes = 2 * TRACK_RATE * max_buffered_ms // 1000
        self.stall_seconds = stall_seconds
        self.session_id = session_id
        self._clock = clock
        self._sleep = sleep
        self._buffer = bytearray()  # PCM16 mono at TRACK_RATE, waiting for recv()
        self._resampler: av.AudioResampler | None = None
        self._source_rate = 0
        self._room = asyncio.Event()  # set whenever recv() took audio out (or clear/stop)
        self._generation = 0  # bumped by clear(): waiting writes drop their chunk
        self._start: float | None = None
        self._pts = 0  # samples sent so far: the next frame's timestamp
        self.frames_sent = 0
        self.audio_frames_sent = 0  # frames that carried some reply audio
        self.cleared_ms = 0  # audio dropped by clear() (cancelled replies)
        self.dropped_ms = 0  # audio dropped by writes to a track nobody drained

    @property
    def buffered_ms(self) -> int:
        """Audio waiting to be sent, in ms."""
        return len(self._buffer) * 1000 // (2 * TRACK_RATE)

    # -- the speaker's side ------------------------------------------------

    async def write(self, pcm: bytes, sample_rate: int) -> None:
        """Add PCM16 mono at `sample_rate`; waits while the buffer is full."""
        if self.readyState != "live" or not pcm:
            return
        generation = self._generation
        data = self._convert(pcm, sample_rate)
        deadline = self._clock() + self.stall_seconds
        while len(self._buffer) >= self.max_buffered_bytes:
            if self.readyState != "live" or generation != self._generation:
                return  # stopped or cleared while waiting: this chunk is not wanted
            left = deadline - self._clock()
            if left <= 0:
                self._drop(len(data))
                return
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), left)
        if self.readyState == "live" and generation == self._generation:
            self._buffer += data

    def flush(self) -> None:
        """The reply's audio is complete: push out what the resampler holds."""
        resampler, self._resampler = self._resampler, None
        self._source_rate = 0
        if resampler is None or self.readyState != "live":
            return
        tail = b"".join(_pcm(f) for f in resampler.resample(None))
        self._buffer += tail

    def clear(self) -> int:
        """Drop every buffered sample now (a cancelled reply); the ms dropped."""
        self._generation += 1
        self._resampler = None
        self._source_rate = 0
        dropped = len(self._buffer)
        self._buffer.clear()
        self._room.set()
        ms = dropped * 1000 // (2 * TRACK_RATE)
        self.cleared_ms += ms
        return ms

    def stop(self) -> None:
        super().stop()
        self._buffer.clear()
        self._resampler = None
        self._room.set()

    def _convert(self, pcm: bytes, rate: int) -> bytes:
        if len(pcm) % 2:
            pcm = pcm[:-1]
        if rate == TRACK_RATE:
            return bytes(pcm)
        if self._resampler is None or rate != self._source_rate:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=TRACK_RATE)
            self._source_rate = rate
        samples = np.frombuffer(pcm, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = rate
        return b"".join(_pcm(f) for f in self._resampler.resample(frame))

    def _drop(self, nbytes: int) -> None:
        first = self.dropped_ms == 0
        self.dropped_ms += max(1, nbytes * 1000 // (2 * TRACK_RATE))
        if first:
            logger.warning(
                "webrtc reply audio dropped: the track is not being sent",
                extra={"session_id": self.session_id},
            )

    # -- aiortc's side -------------------------------------------------------

    async def recv(self) -> av.AudioFrame:
        """The next 20 ms frame, at its time (reply audio, else silence)."""
        if self.readyState != "live":
            raise MediaStreamError
        now = self._clock()
        if self._start is None:
            self._start = now
        else:
            self._pts += self.frame_samples
            due = self._start + self._pts / TRACK_RATE
            if now - due > LATE_RESET_SECONDS:
                self._start = now - self._pts / TRACK_RATE  # do not burst to catch up
            elif due > now:
                await self._sleep(due - now)
            if self.readyState != "live":
                raise MediaStreamError
        chunk = bytes(self._buffer[: self.frame_bytes])
        if chunk:
            del self._buffer[: self.frame_bytes]
            self.audio_frames_sent += 1
            self._room.set()
        if len(chunk) < self.frame_bytes:
            chunk += bytes(self.frame_bytes - len(chunk))
        samples = np.frombuffer(chunk, dtype="<i2").reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
        frame.sample_rate = TRACK_RATE
        frame.pts = self._pts
        frame.time_base = fractions.Fraction(1, TRACK_RATE)
        self.frames_sent += 1
        return frame


def _pcm(frame: av.AudioFrame) -> bytes:
    return bytes(frame.to_ndarray().astype("<i2", copy=False).tobytes())
