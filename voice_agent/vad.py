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

With `turn_check` (an end-of-turn detector is present, see turn.py) the
hangover is replaced by two steps:

    check     min_silence_ms without speech -> TurnCheck(audio so far,
              silence included); the driver answers with turn_decision():
              complete closes the utterance at once ("end_of_turn"); again at
              each recheck_ms point while the silence lasts (the schedule
              that decides is the driver's, see turn.threshold_at)
    stopped   max_silence_ms without speech and no complete decision ->
              SpeechStopped("silence"); more speech first makes the check stale

Which frames are speech comes from a FrameScorer: webrtcvad (default, every
frame at once) or Silero VAD (`vad="silero"`, a small ONNX network on 32 ms
windows, much better at telling music, clatter and crowd noise from speech;
its decisions lag the audio by up to one window). Both share the loudness
gates below, and the Segmenter is the same for both.

All positions are 16 kHz frame counts: soxr's stream output is aligned with
the input (its filter delay is trimmed), so frame k starts at k * 20 ms of the
input stream whatever its rate; only the moment events are emitted lags.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import webrtcvad

from voice_agent.audio import FRAME_MS, StreamResampler, check_pcm16_length, validate_format
from voice_agent.engine.types import SAMPLE_RATE, AudioArray
from voice_agent.errors import ModelLoadError

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
_TURN_WINDOW_FRAMES = 8000 // FRAME_MS  # a TurnCheck carries at most the last 8 s
# Silero: speech from this probability at onset, and while inside an utterance
# down to the lower one (the hysteresis Silero's own iterator uses).
_SILERO_ON = 0.5
_SILERO_OFF = 0.35
# Speech scores 0.8 or more in almost every frame; music, glass and clatter
# reach it in a few scattered frames at most. Only such frames count as
# voiced (barge-in), and with Silero an utterance starts only after
# min_speech_ms of them.
_SILERO_SURE = 0.8
_SILERO_WINDOW = 512  # samples per Silero call at 16 kHz
_SILERO_CONTEXT = 64  # samples of the previous window prepended to each call
VAD_KINDS = ("webrtc", "silero")


@dataclass(frozen=True)
class VadConfig:
    aggressiveness: int = 2  # webrtcvad 0..3
    preroll_ms: int = 300  # audio before the onset included in the utterance
    hangover_ms: int = 600  # this much silence ends the utterance
    min_speech_ms: int = 200  # shorter bursts are dropped as noise (counted)
    max_utterance_ms: int = 30000  # longer speech is closed ("max_length") and continues
    vad: str = "webrtc"  # frame scorer: "webrtc" or "silero"
    turn_check: bool = False  # TurnCheck at min_silence_ms, close at max_silence_ms
    min_silence_ms: int = 200  # with turn_check: silence before the detector is asked
    max_silence_ms: int = 1500  # with turn_check: silence that closes an unfinished turn
    # with turn_check: later silence points (ms, each above min_silence_ms and
    # below max_silence_ms) where the detector is asked again
    recheck_ms: tuple[int, ...] = ()


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
class TurnCheck:
    """min_silence_ms (then each recheck_ms) of silence, emitted only with
    `turn_check`: is the turn over? Answer with Segmenter.turn_decision(
    utterance_id, check, ...); `check` (the last speech frame) makes an answer
    stale once speech resumes. Checks of one pause share `check` and differ in
    `silence_ms`."""

    utterance_id: int
    check: int
    audio: AudioArray  # the utterance so far, silence included, at most the last 8 s
    silence_ms: int = 0  # silence after the last speech frame, included at the end of `audio`


@dataclass(frozen=True)
class SpeechStopped:
    utterance_id: int
    start_ms: int
    end_ms: int  # end of the last speech frame, not where the hangover ended
    reason: str  # "end_of_turn" | "silence" | "max_length" | "commit" | "end_of_stream"
    audio: AudioArray  # 16 kHz mono float32: pre-roll + speech (+ up to 100 ms tail)
    eot_probability: float | None = None  # the detector's answer for the current pause
    voiced_ms: int = 0  # frames scored as speech, in ms


SegmenterEvent = SpeechStarted | SpeechPaused | TurnCheck | SpeechStopped


class FrameScorer(Protocol):
    """Speech probability of 20 ms frames, in order. `score` may answer fewer
    frames than it was given (it waits for more audio); `finish` answers the
    rest at the end of the stream."""

    def score(self, pcm: bytes) -> list[float]: ...

    def finish(self) -> list[float]: ...


class WebrtcScorer:
    def __init__(self, aggressiveness: int) -> None:
        self._vad = webrtcvad.Vad(aggressiveness)
        self.is_speech: Callable[[bytes, int], bool] = self._vad.is_speech

    def score(self, pcm: bytes) -> list[float]:
        is_speech = self._vad.is_speech
        return [
            1.0 if is_speech(pcm[i : i + _FRAME_BYTES], SAMPLE_RATE) else 0.0
            for i in range(0, len(pcm), _FRAME_BYTES)
        ]

    def finish(self) -> list[float]:
        return []


class SileroModel:
    """Silero VAD's ONNX network (bundled in the silero-vad package), loaded
    once per process and shared by every session; each session keeps its own
    recurrent state in a SileroScorer. One CPU thread."""

    def __init__(self, path: str | None = None) -> None:
        import onnxruntime as ort

        if path is None:  # located without importing silero_vad (which imports torch)
            found = package_data_path("silero-vad", "silero_vad/data/silero_vad.onnx")
            if found is None:
                raise ModelLoadError("--vad silero needs the silero-vad package: voice-agent[turn]")
            path = str(found)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self._session = ort.InferenceSession(
            path, sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)

    def run(self, x: np.ndarray, state: np.ndarray) -> tuple[float, np.ndarray]:
        out, new_state = self._session.run(
            None, {"input": x[None, :], "state": state, "sr": self._sr}
        )
        return float(out[0, 0]), new_state


def package_data_path(dist: str, relative: str) -> Path | None:
    """A data file of an installed distribution, without importing its code."""
    try:
        located = metadata.distribution(dist).locate_file(relative)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(located))
    return path if path.is_file() else None


@cache
def silero_model() -> SileroModel:
    """The process-wide Silero model (loaded on first use)."""
    return SileroModel()


class SileroScorer:
    """Frame k gets the probability of the 32 ms window holding its middle."""

    def __init__(self, model: SileroModel) -> None:
        self._model = model
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(_SILERO_CONTEXT, np.float32)
        self._buf = np.zeros(0, np.float32)
        self._probs: deque[float] = deque()
        self._probs_base = 0  # window index of _probs[0]
        self._frames = 0  # frames received
        self._scored = 0  # frames answered

    def score(self, pcm: bytes) -> list[float]:
        self._frames += len(pcm) // _FRAME_BYTES
        self._buf = np.concatenate([self._buf, _to_float(pcm)])
        while len(self._buf) >= _SILERO_WINDOW:
            self._window(self._buf[:_SILERO_WINDOW])
            self._buf = self._buf[_SILERO_WINDOW:]
        return self._answer()

    def finish(self) -> list[float]:
        if len(self._buf):
            self._window(np.pad(self._buf, (0, _SILERO_WINDOW - len(self._buf))))
            self._buf = self._buf[:0]
        out = self._answer()
        out += [0.0] * (self._frames - self._scored)
        self._scored = self._frames
        return out

    def _window(self, x: np.ndarray) -> None:
        p, self._state = self._model.run(np.concatenate([self._context, x]), self._state)
        self._context = x[-_SILERO_CONTEXT:]
        self._probs.append(p)

    def _answer(self) -> list[float]:
        out: list[float] = []
        while self._scored < self._frames:
            w = (self._scored * _FRAME_SAMPLES + _FRAME_SAMPLES // 2) // _SILERO_WINDOW
            if w >= self._probs_base + len(self._probs):
                break
            while self._probs_base < w:
                self._probs.popleft()
                self._probs_base += 1
            out.append(self._probs[0])
            self._scored += 1
        return out


def make_scorer(config: VadConfig, silero: Any = None) -> FrameScorer:
    if config.vad == "silero":
        return SileroScorer(silero if silero is not None else silero_model())
    return WebrtcScorer(config.aggressiveness)


class _Utterance:
    """Frames of one (candidate) utterance, counted in 16 kHz frames."""

    def __init__(self, start: int, audio_start: int, frames: list[bytes], peak_db: float) -> None:
        self.start = start  # first speech frame
        self.audio_start = audio_start  # first frame in `frames` (pre-roll included)
        self.frames = frames
        self.last_speech = start  # index of the last speech frame
        self.peak_db = peak_db
        self.voiced = 1  # frames scored as speech
        self.eot: tuple[int, float] | None = None  # (check, probability) of the last decision
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
        silero: SileroModel | None = None,
    ) -> None:
        """`silero`: the shared model for vad="silero" (default: silero_model())."""
        validate_format(sample_rate, channels)
        if not 0 <= config.aggressiveness <= 3:
            raise ValueError("aggressiveness must be 0..3")
        if config.vad not in VAD_KINDS:
            raise ValueError(f"vad must be one of {', '.join(VAD_KINDS)}")
        if config.turn_check and not 0 < config.min_silence_ms < config.max_silence_ms:
            raise ValueError("need 0 < min_silence_ms < max_silence_ms")
        self.config = config
        self.sample_rate = sample_rate
        self.channels = channels
        self._resampler = StreamResampler(sample_rate, channels)
        self._scorer = make_scorer(config, silero)
        # webrtcvad answers every frame at once: _run's one-frame fast path
        self._is_speech = self._scorer.is_speech if isinstance(self._scorer, WebrtcScorer) else None
        self._sure_start = config.vad == "silero"
        self._unscored: deque[tuple[bytes, float]] = deque()  # (frame, dB) awaiting a score
        self._preroll = max(0, config.preroll_ms // FRAME_MS)
        self._drop_after = max(1, -(-config.hangover_ms // FRAME_MS))
        self._check: int | None = None
        self._checks: frozenset[int] = frozenset()  # silent frames at which to ask
        if config.turn_check:
            self._check = max(1, -(-config.min_silence_ms // FRAME_MS))
            self._hangover = max(self._check + 1, -(-config.max_silence_ms // FRAME_MS))
            later = {-(-ms // FRAME_MS) for ms in config.recheck_ms}
            if any(not self._check < k < self._hangover for k in later):
                raise ValueError("recheck_ms must lie between min_silence_ms and max_silence_ms")
            self._checks = frozenset({self._check, *later})
        else:
            self._hangover = self._drop_after
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
        first_close = self._hangover if self._check is None else self._check
        self._pause_events = pause_events and first_close > _TAIL_FRAMES

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
    def voiced_ms(self) -> int:
        """Frames of the open utterance scored as speech, in ms (0 when none)."""
        u = self._utt
        return 0 if u is None else u.voiced * FRAME_MS

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

    def turn_decision(
        self, utterance_id: int, check: int, probability: float, complete: bool
    ) -> list[SegmenterEvent]:
        """The detector's answer to TurnCheck(utterance_id, check): `complete`
        closes the utterance now ("end_of_turn"); otherwise it stays open until
        max_silence_ms or more speech. Stale answers (speech resumed, or the
        utterance closed meanwhile) are ignored."""
        u = self._utt
        if u is None or not u.started or u.utterance_id != utterance_id:
            return []
        if u.last_speech != check:
            return []
        u.eot = (check, probability)
        return self._close("end_of_turn", check + 1) if complete else []

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
        self._steps(self._scorer.finish(), events)
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
        if whole == len(data) == _FRAME_BYTES and self._is_speech is not None:
            return self._one_frame(data)
        self._pending = data[whole:]
        if not whole:
            return []
        samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.float64)
        if whole == _FRAME_BYTES:  # the usual 20 ms frame: one dot product
            powers = [float(samples.dot(samples)) / _FRAME_SAMPLES]
        else:  # per-frame mean square, without np.mean's per-call overhead
            rows = samples.reshape(-1, _FRAME_SAMPLES)
            powers = (np.einsum("ij,ij->i", rows, rows) / _FRAME_SAMPLES).tolist()
        for i, p in enumerate(powers):
            frame = data[i * _FRAME_BYTES : (i + 1) * _FRAME_BYTES]
            self._unscored.append((frame, 10.0 * math.log10(p / 1073741824.0 + 1e-12)))
        events: list[SegmenterEvent] = []
        self._steps(self._scorer.score(data[:whole]), events)
        return events

    def _one_frame(self, frame: bytes) -> list[SegmenterEvent]:
        """The usual case, one whole 20 ms frame with webrtcvad: what _run
        and _steps do, without their per-call bookkeeping (it is the server's
        largest cost per audio frame under many streams)."""
        assert self._is_speech is not None and not self._unscored
        self._pending = b""
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float64)
        power = float(samples.dot(samples)) / _FRAME_SAMPLES  # as in _run, to the bit
        db = 10.0 * math.log10(power / 1073741824.0 + 1e-12)
        voiced = self._is_speech(frame, SAMPLE_RATE)  # always: webrtcvad adapts per frame
        speech = self._loud(db) and voiced
        events: list[SegmenterEvent] = []
        self._step(frame, speech, speech, db, events)  # webrtcvad scores 0 or 1
        return events

    def _steps(self, scores: list[float], events: list[SegmenterEvent]) -> None:
        """Step through the frames that got their scores (in order)."""
        for score in scores:
            frame, db = self._unscored.popleft()
            threshold = _SILERO_ON if self._utt is None else _SILERO_OFF
            speech = self._loud(db) and score >= threshold
            self._step(frame, speech, speech and score >= _SILERO_SURE, db, events)

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

    def _step(
        self, frame: bytes, speech: bool, sure: bool, db: float, events: list[SegmenterEvent]
    ) -> None:
        index = self._frame
        self._frame += 1
        self._ring.append(frame)
        self._recent.append(speech)
        u = self._utt
        if u is None:
            if speech and sum(self._recent) >= _ONSET_VOICED:
                self._open(index, db, sure)
            return
        u.frames.append(frame)
        if speech and db >= u.peak_db - _PEAK_RANGE_DB:
            u.last_speech = index
            u.peak_db = max(u.peak_db, db)
            u.voiced += sure
        if (
            not u.started
            and u.last_speech + 1 - u.start >= self._min_speech
            and (not self._sure_start or u.voiced >= self._min_speech)
        ):
            self._start(u, events)
        silent = index - u.last_speech
        if silent == _TAIL_FRAMES and u.started and self._pause_events:
            keep = u.last_speech + 1 + _TAIL_FRAMES - u.audio_start  # as _close("silence")
            events.append(SpeechPaused(u.utterance_id, _to_float(b"".join(u.frames[:keep]))))
        if silent in self._checks and u.started:
            audio = _to_float(b"".join(u.frames[-_TURN_WINDOW_FRAMES:]))
            events.append(TurnCheck(u.utterance_id, u.last_speech, audio, silent * FRAME_MS))
        if not u.started and silent >= self._drop_after:
            self._drop(u)
        elif silent >= self._hangover:
            if u.started:
                events += self._close("silence", u.last_speech + 1)
            else:
                self._drop(u)
        elif index + 1 - u.audio_start >= self._max_frames:
            if u.started:
                self._split(u, index + 1, events)
            else:  # (Silero) a long stretch of maybe-speech that never was sure
                self._drop(u)

    def _open(self, index: int, db: float, sure: bool) -> None:
        """Onset: the utterance starts at the first speech frame in the window."""
        recent = list(self._recent)
        start = index - len(recent) + 1 + recent.index(True)
        ring = list(self._ring)
        first = index - len(ring) + 1  # frame index of ring[0]
        audio_start = max(first, start - self._preroll)
        self._utt = _Utterance(start, audio_start, ring[audio_start - first :], db)
        self._utt.last_speech = index
        self._utt.voiced = int(sure)

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
        nxt.voiced = 0
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
        eot = u.eot[1] if u.eot is not None and u.eot[0] == u.last_speech else None
        events.append(
            SpeechStopped(
                u.utterance_id,
                u.start * FRAME_MS,
                end * FRAME_MS,
                reason,
                audio,
                eot_probability=eot,
                voiced_ms=u.voiced * FRAME_MS,
            )
        )
        return events


def _to_float(pcm: bytes) -> AudioArray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / np.float32(32768.0)


def _to_pcm16(a: AudioArray) -> bytes:
    scaled = np.clip(np.round(a * np.float32(32768.0)), -32768, 32767)
    return scaled.astype("<i2").tobytes()
