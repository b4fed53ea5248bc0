"""Piper's working memory: bounded per call, given back after it (real Piper)."""

from __future__ import annotations

from typing import Any

import pytest

from voice_agent.tts.piper import MAX_CHARS, PiperTTS, cut_text

# Tiny-model-like noise: words, few sentence marks (one long "sentence").
NOISE = (
    "bou audio oven today new timer Skip over question earalking timer Skipalicsed "
    "train Sariz abou Zrose is doarter pecl Set excit Tra lose Ber tired May "
)


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def tts() -> PiperTTS:
    return PiperTTS()


def test_cut_text_keeps_every_word_in_bounded_parts() -> None:
    text = NOISE * 8
    parts = cut_text(text, 100)
    assert all(0 < len(p) <= 100 for p in parts)
    assert " ".join(parts).split() == text.split()
    assert cut_text("Short.", 100) == ["Short."]
    assert cut_text("   ", 100) == []
    assert cut_text("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]


def test_cut_text_prefers_a_clause_mark() -> None:
    text = "a" * 60 + ", " + "b " * 40
    assert cut_text(text, 100)[0] == "a" * 60 + ","


def test_long_text_is_synthesized_in_bounded_calls(tts: PiperTTS) -> None:
    seen: list[int] = []
    voice: Any = tts._voice
    original = voice.synthesize

    def spy(text: str, *args: Any, **kwargs: Any) -> Any:
        seen.append(len(text))
        return original(text, *args, **kwargs)

    voice.synthesize = spy
    try:
        audio, rate = tts.synthesize(NOISE * 4)
    finally:
        del voice.synthesize
    assert len(seen) > 1 and max(seen) <= MAX_CHARS
    assert len(audio) / rate > 10  # all of it was spoken


def test_the_onnx_arena_is_off(tts: PiperTTS) -> None:
    assert tts._voice.session.get_session_options().enable_cpu_mem_arena is False


def test_memory_does_not_grow_with_long_replies(tts: PiperTTS) -> None:
    # Before: the arena kept each call's peak (a 450-character piece left the
    # process about 600 MB larger, for good).
    tts.synthesize("Hello, I am ready.")
    before = rss_mib()
    for _ in range(2):
        tts.synthesize(NOISE * 3)
    assert rss_mib() - before < 100
