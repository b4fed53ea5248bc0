"""Config: one dataclass; flags over env vars over defaults."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest

from voice_agent.config import ENV_PREFIX, Config, add_arguments
from voice_agent.errors import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


class RecordingParser(argparse.ArgumentParser):
    """Keeps the Action each add_argument() call returns (argparse's public API)."""

    def __init__(self) -> None:
        self.added: list[argparse.Action] = []  # before -h is added
        super().__init__()

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.added.append(action)
        return action


def test_defaults_without_flags_or_env() -> None:
    config = Config.from_sources(parse([]), env={})
    assert config == Config()
    assert (config.host, config.port) == ("127.0.0.1", 8765)
    assert config.max_message_bytes == 64 * 1024


def test_env_vars_fill_fields_with_their_types() -> None:
    env = {
        "VOICE_AGENT_PORT": "9000",
        "VOICE_AGENT_TEMPERATURE": "0.5",
        "VOICE_AGENT_SYSTEM_PROMPT": "Be brief.",
        "VOICE_AGENT_MODEL": "/models/qwen",
    }
    config = Config.from_sources(parse([]), env=env)
    assert config.port == 9000
    assert config.temperature == 0.5
    assert config.system_prompt == "Be brief."
    assert config.model == "/models/qwen"


def test_flags_win_over_env_vars() -> None:
    args = parse(["--port", "9100", "--hangover-ms", "800"])
    config = Config.from_sources(args, env={"VOICE_AGENT_PORT": "9000"})
    assert (config.port, config.hangover_ms) == (9100, 800)


def test_every_field_has_a_flag_with_help_naming_its_env_var() -> None:
    parser = RecordingParser()
    add_arguments(parser)
    actions = {a.dest: a for a in parser.added}
    for f in dataclasses.fields(Config):
        action = actions[f.name]
        assert action.help and ENV_PREFIX + f.name.upper() in action.help
        assert action.option_strings == [f.metadata.get("flag") or "--" + f.name.replace("_", "-")]


def test_repeatable_ice_server_flag_and_comma_separated_env() -> None:
    assert Config.from_sources(parse([]), env={}).ice_servers == ()
    args = parse(["--ice-server", "stun:a:3478", "--ice-server", "turn:u:p@b:3478"])
    assert Config.from_sources(args, env={}).ice_servers == ("stun:a:3478", "turn:u:p@b:3478")
    env = {"VOICE_AGENT_ICE_SERVERS": "stun:a:3478, stun:c:19302"}
    assert Config.from_sources(parse([]), env=env).ice_servers == ("stun:a:3478", "stun:c:19302")


def test_bad_env_value_is_a_clear_config_error() -> None:
    with pytest.raises(ConfigError, match="VOICE_AGENT_PORT='eighty' is not a valid int"):
        Config.from_sources(parse([]), env={"VOICE_AGENT_PORT": "eighty"})


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("vad_aggressiveness", 4, "vad_aggressiveness must be 0..3"),
        ("max_utterance_ms", 60000, "max_utterance_ms must be 1000..30000"),
        ("log_format", "xml", "log_format must be text or json"),
        ("max_sessions", 0, "max_sessions must be at least 1"),
        ("continue_window_ms", -1, "continue_window_ms must be 0 or more"),
        ("continue_heard_ms", -5, "continue_heard_ms must be 0 or more"),
    ],
)
def test_invalid_values_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Config(**{field: value})  # type: ignore[arg-type]
