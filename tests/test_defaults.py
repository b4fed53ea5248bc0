"""Defaults defined once: Config's turn-taking fields, VadConfig and
SessionConfig all take theirs from voice_agent.session_defaults."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from voice_agent import session_defaults as D
from voice_agent.config import Config
from voice_agent.session import SessionConfig
from voice_agent.vad import VadConfig

# Config field -> (the core's field, the shared constant)
VAD = {
    "vad": ("vad", D.VAD),
    "vad_aggressiveness": ("aggressiveness", D.VAD_AGGRESSIVENESS),
    "preroll_ms": ("preroll_ms", D.PREROLL_MS),
    "hangover_ms": ("hangover_ms", D.HANGOVER_MS),
    "min_speech_ms": ("min_speech_ms", D.MIN_SPEECH_MS),
    "max_utterance_ms": ("max_utterance_ms", D.MAX_UTTERANCE_MS),
    "min_silence_ms": ("min_silence_ms", D.MIN_SILENCE_MS),
    "max_silence_ms": ("max_silence_ms", D.MAX_SILENCE_MS),
}
SESSION = {
    "barge_in_ms": ("barge_in_ms", D.BARGE_IN_MS),
    "barge_in_speaking_ms": ("barge_in_speaking_ms", D.BARGE_IN_SPEAKING_MS),
    "max_queued_utterances": ("max_queued_utterances", D.MAX_QUEUED_UTTERANCES),
    "continue_window_ms": ("continue_window_ms", D.CONTINUE_WINDOW_MS),
    "continue_heard_ms": ("continue_heard_ms", D.CONTINUE_HEARD_MS),
    "max_text_chars": ("max_text_chars", D.MAX_TEXT_CHARS),
    "turn_threshold": ("turn_threshold", D.TURN_THRESHOLD),
}


def config_default(name: str) -> object:
    return next(f.default for f in dataclasses.fields(Config) if f.name == name)


@pytest.mark.parametrize(("config_field", "core"), sorted(VAD.items()))
def test_vad_defaults_agree(config_field: str, core: tuple[str, object]) -> None:
    field, shared = core
    assert config_default(config_field) == getattr(VadConfig(), field) == shared


@pytest.mark.parametrize(("config_field", "core"), sorted(SESSION.items()))
def test_session_defaults_agree(config_field: str, core: tuple[str, object]) -> None:
    field, shared = core
    assert config_default(config_field) == getattr(SessionConfig(), field) == shared


def test_every_shared_default_is_used() -> None:
    """Each constant of session_defaults is one of the pairs above (a new one
    gets its check)."""
    constants = {k for k in vars(D) if k.isupper()}
    named = {v[1] for v in (*VAD.values(), *SESSION.values())}
    assert all(getattr(D, k) in named for k in constants)
    assert len(constants) == len(VAD) + len(SESSION)


def test_the_core_does_not_import_config() -> None:
    """The core takes the constants, not Config (argparse, the environment)."""
    code = (
        "import sys, voice_agent.session, voice_agent.vad\n"
        "print('voice_agent.config' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
