"""End-of-turn detection: has the speaker finished, or only paused?

The Segmenter asks at silence onsets (a TurnCheck after `min_silence_ms`); the
driver runs a detector on the audio so far and feeds the probability back
(Session.on_turn_decision). This module holds the detector side:

    TurnDetector   the interface: probabilities for a batch of clips (blocking)
    SmartTurn      Smart Turn v3.x (BSD-2), an ONNX classifier on the last 8 s
                   as 80-bin Whisper log-mel features; one CPU thread
    TurnBatcher    the async front: runs the detector off the event loop on
                   one worker thread; checks that arrive while it is busy are
                   answered together in the next batch
    load_detector  what the config asks for: --turn-model PATH, else the file
                   bundled in the pipecat-ai wheel (the `turn` extra), else
                   None: the silence fallback, where `hangover_ms` of silence
                   alone ends a turn
    threshold_at   the decision schedule: the probability that closes the turn
                   at each check (`turn_threshold` at min_silence_ms, then the
                   `turn_rechecks` pairs SILENCE_MS:THRESHOLD, if any)

Nothing here imports pipecat code: only its data file is read.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from voice_agent.engine.types import SAMPLE_RATE, AudioArray
from voice_agent.errors import ConfigError, ModelLoadError
from voice_agent.turn_schedule import Rechecks, parse_rechecks, threshold_at
from voice_agent.vad import package_data_path

__all__ = [
    "MAX_PENDING",
    "Rechecks",
    "SmartTurn",
    "TurnBatcher",
    "TurnDetector",
    "WhisperFeatures",
    "bundled_model_path",
    "describe",
    "last_window",
    "load_detector",
    "parse_rechecks",
    "threshold_at",
]

logger = logging.getLogger("voice_agent.turn")

WINDOW_SECONDS = 8  # Smart Turn sees the last 8 s
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
N_MELS = 80
HOP = 160  # 10 ms
N_FFT = 400
N_FRAMES = WINDOW_SAMPLES // HOP  # 800 feature frames
BUNDLED_DIST = "pipecat-ai"
BUNDLED_FILE = "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx"
MAX_PENDING = 256  # checks waiting for the detector; beyond it a check gets None


class TurnDetector(Protocol):
    name: str

    def predict(self, clips: Sequence[AudioArray]) -> list[float]:
        """Probability that each clip (16 kHz mono, ending now) is a finished turn."""
        ...


def last_window(audio: AudioArray) -> AudioArray:
    """The last 8 s, zero-padded at the start when shorter (as the model was trained)."""
    a = np.asarray(audio, dtype=np.float32)
    if len(a) >= WINDOW_SAMPLES:
        return a[-WINDOW_SAMPLES:]
    return np.concatenate([np.zeros(WINDOW_SAMPLES - len(a), np.float32), a])


class WhisperFeatures:
    """80-bin Whisper log-mel features of 8 s windows: (B, 80, 800) float32.

    What transformers' WhisperFeatureExtractor(chunk_length=8) gives for
    last_window() with do_normalize (zero mean, unit variance over the whole
    window, front padding included): the input Smart Turn's reference
    inference (pipecat, smart-turn's inference.py) builds. (Its training
    script lets the extractor pad behind the speech instead; on
    benchmarks/turns.py that input tells finished from cut sentences worse, so
    the reference stays.) The mel filters are transformers'; the rest is one
    batched FFT in numpy: ~15 ms a clip where the extractor takes ~120 ms.
    tests/test_turn.py checks both agree on a real clip."""

    def __init__(self) -> None:
        from transformers import WhisperFeatureExtractor

        fe = WhisperFeatureExtractor(  # type: ignore[no-untyped-call]
            feature_size=N_MELS,
            sampling_rate=SAMPLE_RATE,
            hop_length=HOP,
            chunk_length=WINDOW_SECONDS,
            n_fft=N_FFT,
        )
        self._mel = np.asarray(fe.mel_filters, np.float64)  # (201, 80)
        self._window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as torch.hann_window

    def __call__(self, clips: Sequence[AudioArray]) -> np.ndarray:
        x = np.stack([last_window(c) for c in clips]).astype(np.float64)
        x = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-7)
        x = np.pad(x, ((0, 0), (N_FFT // 2, N_FFT // 2)), mode="reflect")
        frames = sliding_window_view(x, N_FFT, axis=1)[:, ::HOP][:, :N_FRAMES]
        power = np.abs(np.fft.rfft(frames * self._window, axis=-1)) ** 2
        log = np.log10(np.maximum(power @ self._mel, 1e-10))  # (B, 800, 80)
        log = np.maximum(log, log.max(axis=(1, 2), keepdims=True) - 8.0)
        return np.ascontiguousarray(((log + 4.0) / 4.0).transpose(0, 2, 1), np.float32)


class SmartTurn:
    """Smart Turn v3.x ONNX model (input `input_features` (B, 80, 800), output
    the probability (B, 1) that the turn is complete), on one CPU thread."""

    def __init__(self, path: str | Path, name: str | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ModelLoadError(
                "onnxruntime is not installed: pip install voice-agent[turn]"
            ) from exc
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own types for bad files
            raise ModelLoadError(f"cannot load the end-of-turn model {path}") from exc
        inputs = self._session.get_inputs()
        shape = list(inputs[0].shape) if inputs else []
        if len(inputs) != 1 or shape[1:] != [N_MELS, N_FRAMES]:
            raise ModelLoadError(f"{path} is not a Smart Turn model (input {shape})")
        self._input = inputs[0].name
        self.name = name or Path(path).name
        self.path = str(path)
        self._features = WhisperFeatures()

    def features(self, clips: Sequence[AudioArray]) -> np.ndarray:
        return self._features(clips)

    def predict(self, clips: Sequence[AudioArray]) -> list[float]:
        if not clips:
            return []
        out = self._session.run(None, {self._input: self.features(clips)})[0]
        return [float(p) for p in np.asarray(out).reshape(len(clips), -1)[:, 0]]


def bundled_model_path() -> Path | None:
    """The Smart Turn file inside the pipecat-ai wheel, or None when not installed.

    Found from the distribution's file list, so no pipecat code is imported
    (importlib.resources.files would run pipecat's package __init__ files)."""
    return package_data_path(BUNDLED_DIST, BUNDLED_FILE)


_DETECTORS: dict[str, SmartTurn] = {}


def load_detector(
    turn_detection: str = "auto", turn_model: str | None = None
) -> TurnDetector | None:
    """The detector the config asks for (one per process and file), or None for
    the silence fallback. `turn_detection`: "auto" uses a model when one is
    found, "model" requires one (ConfigError otherwise), "silence" never."""
    if turn_detection == "silence":
        return None
    path: Path | None = Path(turn_model) if turn_model else bundled_model_path()
    if path is None:
        if turn_detection == "model":
            raise ConfigError(
                "no end-of-turn model: install voice-agent[turn] or pass --turn-model PATH"
            )
        return None
    if not path.is_file():
        raise ConfigError(f"--turn-model {path}: no such file")
    key = str(path.resolve())
    if key not in _DETECTORS:
        _DETECTORS[key] = SmartTurn(path)
    return _DETECTORS[key]


def describe(detector: TurnDetector | None, hangover_ms: int) -> str:
    """One line for the start-up log."""
    if detector is None:
        return (
            f"end of turn: silence alone ({hangover_ms} ms hangover); no end-of-turn model "
            "(install voice-agent[turn] or pass --turn-model PATH)"
        )
    return f"end of turn: model {detector.name}"


_BATCHERS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, TurnBatcher]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class _Check:
    audio: AudioArray
    future: asyncio.Future[float | None]


class TurnBatcher:
    """Runs one detector off the event loop, batching checks across sessions.

    One worker thread (the model uses one CPU thread). While a batch runs, new
    checks wait and go together into the next one (at most `max_batch` per
    call). At most MAX_PENDING checks wait; beyond that `probability` returns
    None at once and the utterance ends on `max_silence_ms` instead. A detector
    failure is logged and answered with None the same way."""

    def __init__(self, detector: TurnDetector, max_batch: int = 16) -> None:
        self.detector = detector
        self.max_batch = max_batch
        self._pending: list[_Check] = []
        self._worker: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="turn")
        self.batches = 0  # detector calls made
        self.checks = 0  # checks answered by the detector

    @classmethod
    def shared(cls, detector: TurnDetector) -> TurnBatcher:
        """The batcher of `detector` for the running event loop."""
        loop = asyncio.get_running_loop()
        batchers = _BATCHERS.setdefault(loop, {})
        if id(detector) not in batchers:
            batchers[id(detector)] = cls(detector)
        return batchers[id(detector)]

    async def probability(self, audio: AudioArray) -> float | None:
        if len(self._pending) >= MAX_PENDING:
            return None
        fut: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
        self._pending.append(_Check(audio, fut))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run(), name="turn-detector")
        return await fut

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(0)  # let checks that arrive together join this batch
        while self._pending:
            batch = [c for c in self._pending[: self.max_batch] if not c.future.done()]
            del self._pending[: self.max_batch]
            if not batch:
                continue
            probs: list[Any]
            try:
                probs = await loop.run_in_executor(
                    self._executor, self.detector.predict, [c.audio for c in batch]
                )
                self.batches += 1
                self.checks += len(batch)
            except Exception:
                logger.exception("end-of-turn detector failed")
                probs = [None] * len(batch)
            for c, p in zip(batch, probs, strict=True):
                if not c.future.done():
                    c.future.set_result(p)
