"""The Segmenter: 16 kHz frames, loudness gates and the utterance state
machine (see the package doc)."""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from voice_agent.audio import FRAME_MS, StreamResampler, check_pcm16_length, validate_format
from voice_agent.engine.types import SAMPLE_RATE, AudioArray
from voice_agent.vad.events import (
    VAD_KINDS,
    SegmenterEvent,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    TurnCheck,
    VadConfig,
)
from voice_agent.vad.frames import FRAME_BYTES, FRAME_SAMPLES, to_float, to_pcm16
from voice_agent.vad.scoring import (
    SILERO_OFF,
    SILERO_ON,
    SILERO_SURE,
    SileroModel,
    WebrtcScorer,
    make_scorer,
)

_ONSET_WINDOW = 3  # frames looked at for onset
_ONSET_VOICED = 2  # of which this many must be speech
_TAIL_FRAMES = 5  # 100 ms of audio kept after end_ms when available
_SILENT_DB = -75.0  # below this a frame is digital silence: no speech, no floor update
_FLOOR_MARGIN_DB = 10.0
_FLOOR_START_DB = -50.0  # the floor starts at the first non-silent frame, at most this
_FLOOR_RISE_DB = 0.05  # per frame (2.5 dB/s); falls at once to a quieter frame
_PEAK_RANGE_DB = 25.0
_TURN_WINDOW_FRAMES = 8000 // FRAME_MS  # a TurnCheck carries at most the last 8 s

DEFAULT_VAD_CONFIG = VadConfig()  # frozen: one shared default


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
        config: VadConfig = DEFAULT_VAD_CONFIG,
        sample_rate: int = 16000,
        channels: int = 1,
        *,
        pause_events: bool = False,
        silero: SileroModel | None = None,
        keep_ms: int = 0,
    ) -> None:
        """`silero`: the shared model for vad="silero" (default: silero_model()).
        `keep_ms`: keep the last this many ms of 16 kHz audio for audio_span()."""
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
        # the last keep_ms of frames (audio_span); None: not kept
        self._kept: deque[bytes] | None = None
        if keep_ms > 0:
            self._kept = deque(maxlen=-(-keep_ms // FRAME_MS))
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
    def frames_ms(self) -> int:
        """16 kHz frames consumed so far, in ms (where audio_span ends)."""
        return self._frame * FRAME_MS

    @property
    def dropped(self) -> int:
        """Bursts dropped as shorter than min_speech_ms."""
        return self._dropped

    def audio_span(self, start_ms: int, end_ms: int) -> AudioArray | None:
        """The 16 kHz audio from start_ms to end_ms (frame positions, already
        consumed); None when some of it is no longer kept (see keep_ms)."""
        kept = self._kept
        if kept is None:
            return None
        first = self._frame - len(kept)  # frame index of kept[0]
        start, end = start_ms // FRAME_MS, end_ms // FRAME_MS
        if start < first or end > self._frame or start > end:
            return None
        frames = [kept[i - first] for i in range(start, end)]
        return to_float(b"".join(frames))

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
            data = self._pending + to_pcm16(self._resampler.process(pcm))
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
        data = self._pending + to_pcm16(self._resampler.flush())
        if len(data) % FRAME_BYTES:
            data += bytes(FRAME_BYTES - len(data) % FRAME_BYTES)
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
        whole = len(data) - len(data) % FRAME_BYTES
        if whole == len(data) == FRAME_BYTES and self._is_speech is not None:
            return self._one_frame(data)
        self._pending = data[whole:]
        if not whole:
            return []
        samples = np.frombuffer(data[:whole], dtype="<i2").astype(np.float64)
        if whole == FRAME_BYTES:  # the usual 20 ms frame: one dot product
            powers = [float(samples.dot(samples)) / FRAME_SAMPLES]
        else:  # per-frame mean square, without np.mean's per-call overhead
            rows = samples.reshape(-1, FRAME_SAMPLES)
            powers = (np.einsum("ij,ij->i", rows, rows) / FRAME_SAMPLES).tolist()
        for i, p in enumerate(powers):
            frame = data[i * FRAME_BYTES : (i + 1) * FRAME_BYTES]
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
        power = float(samples.dot(samples)) / FRAME_SAMPLES  # as in _run, to the bit
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
            threshold = SILERO_ON if self._utt is None else SILERO_OFF
            speech = self._loud(db) and score >= threshold
            self._step(frame, speech, speech and score >= SILERO_SURE, db, events)

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
        if self._kept is not None:
            self._kept.append(frame)
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
            events.append(SpeechPaused(u.utterance_id, to_float(b"".join(u.frames[:keep]))))
        if silent in self._checks and u.started:
            audio = to_float(b"".join(u.frames[-_TURN_WINDOW_FRAMES:]))
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
        events.append(SpeechStarted(u.utterance_id, u.start * FRAME_MS, u.audio_start * FRAME_MS))

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
        audio = to_float(b"".join(u.frames[: max(0, keep)]))
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
                audio_start_ms=u.audio_start * FRAME_MS,
                closed_ms=self._frame * FRAME_MS,
            )
        )
        return events
