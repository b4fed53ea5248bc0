"""espeak-ng as a subprocess: `--stdout` writes a WAV, read with soundfile."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np
import soundfile

from voice_agent.errors import ConfigError, TtsError


class EspeakTTS:
    """The fallback engine that is always there (Debian's espeak-ng)."""

    name = "espeak-ng"

    def __init__(self, voice: str | None = None, binary: str = "espeak-ng") -> None:
        path = shutil.which(binary)
        if path is None:
            raise ConfigError("espeak-ng is not installed (apt-get install espeak-ng)")
        self.binary = path
        self.voice = voice or "en-us"

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        if not text.strip():
            return np.zeros(0, dtype=np.float32), 22050
        try:
            done = subprocess.run(
                [self.binary, "-v", self.voice, "--stdout"],
                input=text.encode("utf-8"),
                capture_output=True,
                timeout=60,
                check=True,
            )
            data, rate = soundfile.read(io.BytesIO(done.stdout), dtype="float32")
        except (subprocess.SubprocessError, OSError, RuntimeError) as exc:
            raise TtsError("speech synthesis failed") from exc
        if data.ndim > 1:
            data = data.mean(axis=1)
        return np.ascontiguousarray(data, dtype=np.float32), int(rate)
