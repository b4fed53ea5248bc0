"""A fake TTS engine (voice_agent.tts's `name` + `synthesize(text)` interface)
whose audio length the test chooses, so sample counts are exact."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def one_second(text: str) -> float:
    return 1.0


class ToneTTS:
    """Says a 220 Hz tone `seconds(text)` long at `rate` (default: one second
    per piece, whatever the text); `said` records every text it was given."""

    name = "tone"

    def __init__(self, seconds: Callable[[str], float] = one_second, rate: int = 16000) -> None:
        self.seconds = seconds
        self.rate = rate
        self.said: list[str] = []

    def synthesize(self, text: str) -> tuple[np.ndarray, int]:
        self.said.append(text)
        t = np.arange(round(self.seconds(text) * self.rate), dtype=np.float32) / self.rate
        return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), self.rate
