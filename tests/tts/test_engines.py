"""The TTS engines and their loader: real espeak-ng and real Piper (no mocks)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import voice_agent
from tests.helpers.speech import as_pcm16, voiced_fraction
from voice_agent.config import Config
from voice_agent.errors import ConfigError
from voice_agent.tts import load_tts, piper_installed
from voice_agent.tts.espeak import EspeakTTS
from voice_agent.tts.piper import bundled_voice
from voice_agent.tts.speaker import Speech

SENTENCE = "The kitchen light is now switched on."


def check_speech(audio: np.ndarray, rate: int) -> None:
    assert rate >= 16000
    seconds = len(audio) / rate
    assert 1.0 < seconds < 6.0, seconds
    assert voiced_fraction(as_pcm16(audio), rate) > 0.4


def test_espeak_speaks() -> None:
    tts = EspeakTTS()
    audio, rate = tts.synthesize(SENTENCE)
    assert audio.dtype == np.float32
    check_speech(audio, rate)
    silent, _ = tts.synthesize("")
    assert voiced_fraction(as_pcm16(silent), rate) < 0.2


def test_piper_extra_is_installed_and_speaks() -> None:
    # The dev set-up installs voice-agent[tts]; missing it is a failure, not a skip.
    assert piper_installed()
    voice = bundled_voice()
    assert voice.suffix == ".onnx" and Path(str(voice) + ".json").is_file()
    tts = load_tts("auto")
    assert tts is not None and tts.name == "piper"
    audio, rate = tts.synthesize(SENTENCE)
    assert rate == 22050
    check_speech(audio, rate)


def test_piper_takes_a_voice_file_and_refuses_a_missing_one(tmp_path: Path) -> None:
    tts = load_tts("piper", str(bundled_voice()))
    assert tts is not None and tts.name == "piper"
    with pytest.raises(ConfigError, match="needs"):
        load_tts("piper", str(tmp_path / "nope.onnx"))


def test_piper_runs_on_the_threads_it_is_given() -> None:
    from voice_agent.tts.piper import PiperTTS

    one = PiperTTS()  # the default: one CPU thread
    assert one.threads == 1
    two = PiperTTS(threads=2)
    assert two.threads == 2
    audio, rate = one.synthesize(SENTENCE)
    check_speech(audio, rate)


def test_loader_choices() -> None:
    assert load_tts("none") is None
    espeak = load_tts("espeak")
    assert espeak is not None and espeak.name == "espeak-ng"
    with pytest.raises(ConfigError):
        load_tts("festival")
    with pytest.raises(ConfigError):
        Config(tts="festival")


def test_only_the_piper_module_imports_piper() -> None:
    package = Path(voice_agent.__file__).parent
    importers = [
        path.relative_to(package).as_posix()
        for path in package.rglob("*.py")
        if "from piper" in path.read_text() or "import piper\n" in path.read_text()
    ]
    assert importers == ["tts/piper.py"]


async def test_speech_resamples_off_the_event_loop() -> None:
    speech = Speech(EspeakTTS())
    try:
        audio = await speech.synthesize(SENTENCE, 24000)
        assert audio.dtype == np.float32
        check_speech(audio, 24000)
        native, rate = speech.tts.synthesize(SENTENCE)
        assert abs(len(audio) / 24000 - len(native) / rate) < 0.01
    finally:
        speech.close()
