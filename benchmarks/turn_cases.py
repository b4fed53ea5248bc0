"""The cases of benchmarks/turns.py: five one-sentence recordings, each
whole and cut at every word boundary with an inserted pause of room tone
(see benchmarks/turns.py for what they test and how they are scored)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from voice_agent.audio import decode

AUDIO = Path(__file__).resolve().parents[2] / "shared" / "audio"
RATE = 16000
LEAD_S, TAIL_S = 0.5, 2.5
PAUSES_MS = (500, 800, 1200)  # thinking pauses inserted at each cut
MIN_PREFIX_MS = 300

# (word, start_ms, end_ms): pocketsphinx 5.0 en-us forced alignment of the transcript
WORDS: dict[str, list[tuple[str, int, int]]] = {
    "jfk.wav": [
        ("and", 290, 630), ("so", 630, 970), ("my", 970, 1240), ("fellow", 1240, 1630),
        ("americans", 1630, 2160), ("ask", 3250, 3850), ("not", 3990, 4300),
        ("what", 5370, 5610), ("your", 5610, 5860), ("country", 5860, 6420),
        ("can", 6420, 6660), ("do", 6660, 6910), ("for", 6910, 7050), ("you", 7050, 7670),
        ("ask", 8150, 8530), ("what", 8530, 8820), ("you", 8820, 9170), ("can", 9200, 9370),
        ("do", 9370, 9630), ("for", 9630, 9780), ("your", 9780, 9990),
        ("country", 9990, 10460),
    ],
    "librispeech-1272-128104-0000.flac": [
        ("mister", 530, 780), ("quilter", 780, 1280), ("is", 1280, 1410), ("the", 1410, 1540),
        ("apostle", 1540, 2150), ("of", 2150, 2250), ("the", 2250, 2340),
        ("middle", 2340, 2600), ("classes", 2600, 3270), ("and", 3300, 3430),
        ("we", 3430, 3590), ("are", 3590, 3660), ("glad", 3660, 4070), ("to", 4070, 4170),
        ("welcome", 4170, 4580), ("his", 4580, 4830), ("gospel", 4830, 5490),
    ],
    "libritts-1089_134686_000007_000004.wav": [
        ("the", 0, 110), ("music", 110, 530), ("came", 530, 780), ("nearer", 780, 1340),
        ("and", 1340, 1490), ("he", 1490, 1620), ("recalled", 1620, 2140),
        ("the", 2140, 2210), ("words", 2210, 2810), ("the", 3190, 3280),
        ("words", 3280, 3720), ("of", 3720, 3800), ("shelley's", 3800, 4360),
        ("fragment", 4360, 4900), ("upon", 4900, 5180), ("the", 5180, 5250),
        ("moon", 5250, 5760), ("wandering", 5760, 6290), ("companionless", 6290, 7180),
        ("pale", 7540, 7930), ("for", 7930, 8130), ("weariness", 8130, 8880),
    ],
    "ldc93s1-16k-mono.wav": [
        ("she", 160, 350), ("had", 350, 620), ("your", 620, 710), ("dark", 710, 1000),
        ("suit", 1000, 1300), ("in", 1300, 1390), ("greasy", 1390, 1740),
        ("wash", 1740, 2080), ("water", 2080, 2310), ("all", 2310, 2500),
        ("year", 2500, 2910),
    ],
    "new-home-in-the-stars-16k.wav": [
        ("we", 650, 760), ("must", 760, 1000), ("find", 1000, 1340), ("a", 1340, 1380),
        ("new", 1380, 1580), ("home", 1580, 2020), ("in", 2020, 2120), ("the", 2120, 2190),
        ("stars", 2190, 3140),
    ],
}  # fmt: skip
RECORDINGS = list(WORDS)


def samples(ms: float) -> int:
    return round(ms * RATE / 1000)


@dataclass
class Case:
    recording: str
    kind: str  # "whole" | "cut"
    audio: np.ndarray
    last_word_start_ms: int  # in the case's audio
    last_word_end_ms: int
    cut_ms: int | None = None  # where the inserted pause starts (cut cases)
    resume_ms: int | None = None  # where the rest starts
    boundary: str | None = None  # "word | word"
    pause_ms: int | None = None
    words: list[tuple[int, int]] = field(default_factory=list)  # (start, end) of each word


def room_tone(a: np.ndarray, seconds: float = 4.0, seed: int = 0) -> np.ndarray:
    """The recording's own background: its quietest 20 ms frames (10th
    percentile; exact zeros excluded), each scaled to their median level (a
    steady floor: frames of different levels in a row would sound like bursts
    to the VAD), in a seeded random order and sign."""
    frames = a[: len(a) // 320 * 320].reshape(-1, 320).astype(np.float64)
    rms = np.sqrt((frames**2).mean(1))
    live = rms > 1e-5  # -100 dBFS
    pick = live & (rms <= np.percentile(rms[live], 10))
    quiet = frames[pick] * (np.median(rms[pick]) / rms[pick])[:, None]
    rng = np.random.default_rng(seed)
    n = samples(seconds * 1000) // 320 + 1
    out = quiet[rng.integers(0, len(quiet), n)] * rng.choice([-1.0, 1.0], size=(n, 1))
    return out.astype(np.float32).reshape(-1)


def _fade(x: np.ndarray, at_end: bool) -> np.ndarray:
    """10 ms linear fade at an edit, so a cut does not click."""
    x = x.copy()
    n = min(160, len(x))
    ramp = np.linspace(1.0, 0.0, n, dtype=np.float32)
    if at_end:
        x[len(x) - n :] *= ramp
    else:
        x[:n] *= ramp[::-1]
    return x


def build_cases(recordings: Iterable[str] = RECORDINGS) -> list[Case]:
    return [case for name in recordings for case in _cases_of(name)]


def _cases_of(name: str) -> list[Case]:
    a = decode(str(AUDIO / name))
    words = WORDS[name]
    tone = room_tone(a)
    lo = max(0, words[0][1] - 200)
    sentence = _fade(_fade(a[samples(lo) : samples(words[-1][2] + 150)], False), True)
    lead = round(LEAD_S * 1000)

    def sil(ms: float) -> np.ndarray:
        return tone[: samples(ms)]

    def at(t: int) -> int:  # aligned ms -> ms in the case's audio
        return lead + t - lo

    whole = np.concatenate([sil(lead), sentence, sil(TAIL_S * 1000)])
    spans = [(at(s), at(e)) for _, s, e in words]
    cases = [Case(name, "whole", whole, *spans[-1], words=spans)]
    for i in range(len(words) - 1):
        end, nxt = words[i][2], words[i + 1][1]
        if end - words[0][1] < MIN_PREFIX_MS:
            continue
        left, right = samples(end - lo), samples(nxt - lo)
        if nxt - end < 40:  # no pause between the words: cut at the quietest 10 ms nearby
            win = sentence[left - 480 : left + 480].astype(np.float64) ** 2
            energy = np.convolve(win, np.ones(160), "same")[160:-160]
            left = right = left - 320 + int(np.argmin(energy))
        for pause in PAUSES_MS:
            audio = np.concatenate(
                [
                    sil(lead),
                    _fade(sentence[:left], True),
                    sil(pause),
                    _fade(sentence[right:], False),
                    sil(TAIL_S * 1000),
                ]
            )
            shift = pause - (right - left) * 1000 // RATE
            cut_ms = lead + left * 1000 // RATE
            boundary = f"{words[i][0]} | {words[i + 1][0]}"
            last = at(words[-1][1]) + shift, at(words[-1][2]) + shift
            moved = spans[: i + 1] + [(s + shift, e + shift) for s, e in spans[i + 1 :]]
            cases.append(
                Case(name, "cut", audio, *last, cut_ms, cut_ms + pause, boundary, pause, moved)
            )
    return cases
