"""Frame scorers: the speech probability of each 20 ms frame.

WebrtcScorer   webrtcvad, every frame at once (0 or 1)
SileroScorer   Silero VAD's ONNX network on 32 ms windows (one shared
               SileroModel per process, a recurrent state per session);
               its answers lag the audio by up to one window
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import webrtcvad

from voice_agent.engine.types import SAMPLE_RATE
from voice_agent.errors import ModelLoadError
from voice_agent.vad.events import VadConfig
from voice_agent.vad.frames import FRAME_BYTES, FRAME_SAMPLES, to_float

# Silero: speech from this probability at onset, and while inside an utterance
# down to the lower one (the hysteresis Silero's own iterator uses).
SILERO_ON = 0.5
SILERO_OFF = 0.35
# Speech scores 0.8 or more in almost every frame; music, glass and clatter
# reach it in a few scattered frames at most. Only such frames count as
# voiced (barge-in), and with Silero an utterance starts only after
# min_speech_ms of them.
SILERO_SURE = 0.8
_SILERO_WINDOW = 512  # samples per Silero call at 16 kHz
_SILERO_CONTEXT = 64  # samples of the previous window prepended to each call


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
            1.0 if is_speech(pcm[i : i + FRAME_BYTES], SAMPLE_RATE) else 0.0
            for i in range(0, len(pcm), FRAME_BYTES)
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
        self._frames += len(pcm) // FRAME_BYTES
        self._buf = np.concatenate([self._buf, to_float(pcm)])
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
            w = (self._scored * FRAME_SAMPLES + FRAME_SAMPLES // 2) // _SILERO_WINDOW
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
