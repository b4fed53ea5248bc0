"""Segmenter: PCM chunks in, speech events out (pure; no clocks, no I/O).

Audio of any supported rate/channels is resampled to 16 kHz mono and cut into
20 ms frames. A frame counts as speech when webrtcvad says so AND it is loud
enough: at least `_FLOOR_MARGIN_DB` above a tracked noise floor, and, inside
an utterance, no more than `_PEAK_RANGE_DB` below the utterance's loudest
frame (so crowd noise or a fan after the last word does not stretch the end).

    onset     2 of the last 3 frames are speech; start = first of them
    started   speech has lasted min_speech_ms -> SpeechStarted(start_ms)
    dropped   hangover elapses before that -> no events, `dropped` += 1
    stopped   hangover_ms without speech -> SpeechStopped(end = end of last
              speech frame); also on max length, commit, flush

All positions are 16 kHz frame counts: soxr's stream output is aligned with
the input (its filter delay is trimmed), so frame k starts at k * 20 ms of the
input stream whatever its rate; only the moment events are emitted lags.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np
import webrtcvad

from voice_agent.audio import FRAME_MS, StreamResampler, check_pcm16_length, validate_format
from voice_agent.engine.base import SAMPLE_RATE, AudioArray

_FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000  # 320
_FRAME_BYTES = 2 * _FRAME_SAMPLES  # 640
_ONSET_WINDOW = 3  # frames looked at for onset
_ONSET_VOICED = 2  # of which this many must be speech
_TAIL_FRAMES = 5  # 100 ms of audio kept after end_ms when available
_SILENT_DB = -75.0  # below this a frame is digital silence: no speech, no floor update
_FLOOR_MARGIN_DB = 10.0
_FLOOR_START_DB = -50.0  # the floor starts at the first non-silent frame, at most this
_FLOOR_RISE_DB = 0.05  # per frame (2.5 dB/s); falls at once to a quieter frame
_PEAK_RANGE_DB = 25.0


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = 2  # webrtcvad 0..3
    preroll_ms: int = 300  # audio before the onset included in the utterance
    hangover_ms: int = 600  # this much silence ends the utterance
    min_speech_ms: int = 200  # shorter bursts are dropped as noise (counted)
    max_utterance_ms: int = 30000  # longer speech is closed ("max_length") and continues


@dataclass(frozen=True)
class SpeechStarted:
    utterance_id: int
    start_ms: int


@dataclass(frozen=True)
class SpeechPaused:
    """Speech paused long enough that the hangover is running (emitted only
    with `pause_events`): `audio` is exactly what SpeechStopped("silence") will
    carry if no more speech comes, so a speculative prefill of it can be used
    as is when the utterance closes."""

    utterance_id: int
    audio: AudioArray


@dataclass(frozen=True)
class SpeechStopped:
    utterance_id: int
    start_ms: int
    end_ms: int  # end of the last speech frame, not where the hangover ended
    reason: str  # "silence" | "max_length" | "commit" | "end_of_stream"
    audio: AudioArray  # 16 kHz mono float32: pre-roll + speech (+ up to 100 ms tail)


SegmenterEvent = SpeechStarted | SpeechPaused | SpeechStopped


class _Utterance:
    """Frames of one (candidate) utterance, counted in 16 kHz frames."""

    def __init__(self, start: int, audio_start: int, frames: list[bytes], peak_db: float) -> None:
        self.start = start  # first speech frame
        self.audio_start = audio_start  # first frame in `frames` (pre-roll included)
        self.frames = frames
        self.last_speech = start  # index of the last speech frame
        self.peak_db = peak_db
        self.started = False  # SpeechStarted emitted
        self.continued = False  # continues an utterance closed at max length
        self.utterance_id = 0


class Segmenter:
    """Feed PCM16 chunks of any size; get SpeechStarted/SpeechStopped events."""

    def __init__(
        self,
        config: VadConfig = VadConfig(),
        sample_rate: int = 16000,
        channels: int = 1,
        *,
        pause_events: bool = False,
    ) -> None:
        validate_format(sample_rate, channels)
        if not 0 <= config.aggressiveness <= 3:
            raise ValueError("aggressiveness must be 0..3")
        self.config = config
        self.sample_rate = sample_rate
        self.channels = channels
        self._resampler = StreamResampler(sample_rate, channels)
        self._vad = webrtcvad.Vad(config.aggressiveness)
        self._preroll = max(0, config.preroll_ms // FRAME_MS)
        self._hangover = max(1, -(-config.hangover_ms // FRAME_MS))
        self._min_speech = max(1, -(-config.min_speech_ms // FRAME_MS))
        self._max_frames = max(self._preroll + 2, config.max_utterance_ms // FRAME_MS)
        self._pending = b""  # 16 kHz PCM16 not yet a whole frame
        self._frame = 0  # index of the next frame
        self._ring: deque[bytes] = deque(maxlen=self._preroll + _ONSET_WINDOW)
        self._recent: deque[bool] = deque(maxlen=_ONSET_WINDOW)
        self._floor_db: float | None = None
        self._utt: _Utterance | None = None
        self._next_id = 1
        self._dropped = 0
        self._flushed = False
        # SpeechPaused after _TAIL_FRAMES of silence, while the hangover still runs
        self._pause_events = pause_events and self._hangover > _TAIL_FRAMES

    # -- public -----------------------------------------------------------

    @property
    def in_speech(self) -> bool:
        """An onset was detected and the utterance is not closed yet."""
        return self._utt is not None

    @property
    def speech_ms(self) -> int:
        """From the onset to the end of the last speech frame (0 when none)."""
        u = self._utt
        return 0 if u is None else (u.last_speech + 1 - u.start) * FRAME_MS

    @property
    def position_ms(self) -> int:
        """Input consumed so far, from the input sample count."""
        return self._resampler.in_samples * 1000 // self.sample_rate

    @property
    def dropped(self) -> int:
        """Bursts dropped as shorter than min_speech_ms."""
        return self._dropped

    def feed(self, pcm: bytes) -> list[SegmenterEvent]:
        """Consume interleaved PCM16 LE at the declared rate/channels."""
        if self._flushed:
            raise RuntimeError("segmenter already flushed")
        check_pcm16_length(pcm, self.channels)
        if not pcm:
            return []
        if self._resampler.passthrough and self.channels == 1:
            self._resampler.in_samples += len(pcm) // 2  # 16 kHz mono: used as is
            data = self._pending + pcm
        else:
            data = self._pending + _to_pcm16(self._resampler.process(pcm))
        return self._run(data)

    def commit(self) -> list[SegmenterEvent]:
        """Close the utterance in progress now (push-to-talk), reason "commit"."""
        if self._utt is None:
            return []
        return self._close("commit", self._utt.last_speech + 1)

    def flush(self) -> list[SegmenterEvent]:
        """End of stream: process what is left and close any utterance."""
        if self._flushed:
            return []
        self._flushed = True
        data = self._pending + _to_pcm16(self._resampler.flush())
        if len(data) % _FRAME_BYTES:
            data += bytes(_FRAME_BYTES - len(data) % _FRAME_BYTES)
        events = self._run(data)
        u = self._utt
        if u is not None:
            if u.last_speech + 1 - u.start >= self._min_speech or u.started:
                events += self._close("end_of_stream", u.last_speech + 1)
            else:
                self._drop(u)
        return events

    # -- frames -----------------------------------------------------------

    def _run(self, data: bytes) -> list[SegmenterEvent]:
        whole = len(data) - len(data) % _FRAME_BYTES
        self._pending = data[whole:]
        if not whole:
            return []
        samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.float64)
        power = np.square(samples).reshape(-1, _FRAME_SAMPLES).mean(axis=1)
        events: list[SegmenterEvent] = []
        is_speech = self._vad.is_speech
        for i, p in enumerate(power.tolist()):
            frame = data[i * _FRAME_BYTES : (i + 1) * _FRAME_BYTES]
            db = 10.0 * math.log10(p / 1073741824.0 + 1e-12)
            speech = self._loud(db) and is_speech(frame, SAMPLE_RATE)
            self._step(frame, speech, db, events)
        return events

    def _loud(self, db: float) -> bool:
        """Track the noise floor; True when the frame stands out of it."""
        if db < _SILENT_DB:
            return False
        floor = self._floor_db
        if floor is None:
            floor = min(db, _FLOOR_START_DB)
        if db < floor:
            self._floor_db = db
            return False
        self._floor_db = floor + _FLOOR_RISE_DB
        return db >= floor + _FLOOR_MARGIN_DB

    def _step(self, frame: bytes, speech: bool, db: float, events: list[SegmenterEvent]) -> None:
        index = self._frame
        self._frame += 1
        self._ring.append(frame)
        self._recent.append(speech)
        u = self._utt
        if u is None:
            if speech and sum(self._recent) >= _ONSET_VOICED:
                self._open(index, db)
            return
        u.frames.append(frame)
        if speech and db >= u.peak_db - _PEAK_RANGE_DB:
            u.last_speech = index
            u.peak_db = max(u.peak_db, db)
        if not u.started and u.last_speech + 1 - u.start >= self._min_speech:
            self._start(u, events)
        silent = index - u.last_speech
        if silent == _TAIL_FRAMES and u.started and self._pause_events:
            keep = u.last_speech + 1 + _TAIL_FRAMES - u.audio_start  # as _close("silence")
            events.append(SpeechPaused(u.utterance_id, _to_float(b"".join(u.frames[:keep]))))
        if silent >= self._hangover:
            if u.started:
                events += self._close("silence", u.last_speech + 1)
            else:
                self._drop(u)
        elif index + 1 - u.audio_start >= self._max_frames:
            self._split(u, index + 1, events)

    def _open(self, index: int, db: float) -> None:
        """Onset: the utterance starts at the first speech frame in the window."""
        recent = list(self._recent)
        start = index - len(recent) + 1 + recent.index(True)
        ring = list(self._ring)
        first = index - len(ring) + 1  # frame index of ring[0]
        audio_start = max(first, start - self._preroll)
        self._utt = _Utterance(start, audio_start, ring[audio_start - first :], db)
        self._utt.last_speech = index

    def _drop(self, u: _Utterance) -> None:
        """A burst shorter than min_speech_ms: no events, counted."""
        self._utt = None
        if not u.continued:
            self._dropped += 1

    def _start(self, u: _Utterance, events: list[SegmenterEvent]) -> None:
        u.started = True
        u.utterance_id = self._next_id
        self._next_id += 1
        events.append(SpeechStarted(u.utterance_id, u.start * FRAME_MS))

    def _split(self, u: _Utterance, end: int, events: list[SegmenterEvent]) -> None:
        """Max length: close at `end` and continue as the next utterance."""
        if not u.started:
            self._start(u, events)
        events += self._close("max_length", end)
        nxt = _Utterance(end, end, [], u.peak_db)
        nxt.last_speech = end - 1  # not speech yet: nothing after `end` was heard
        nxt.continued = True
        self._utt = nxt
        if nxt.last_speech + 1 - nxt.start >= self._min_speech:
            self._start(nxt, events)

    def _close(self, reason: str, end: int) -> list[SegmenterEvent]:
        """SpeechStopped for the utterance in progress, ending at frame `end`."""
        u = self._utt
        assert u is not None
        events: list[SegmenterEvent] = []
        if not u.started:
            self._start(u, events)
        self._utt = None
        self._recent.clear()
        keep = end - u.audio_start + (_TAIL_FRAMES if reason != "max_length" else 0)
        audio = _to_float(b"".join(u.frames[: max(0, keep)]))
        events.append(
            SpeechStopped(u.utterance_id, u.start * FRAME_MS, end * FRAME_MS, reason, audio)
        )
        return events


def _to_float(pcm: bytes) -> AudioArray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def _to_pcm16(a: AudioArray) -> bytes:
    scaled = np.clip(np.round(a * np.float32(32768.0)), -32768, 32767)
    return scaled.astype("<i2").tobytes()
