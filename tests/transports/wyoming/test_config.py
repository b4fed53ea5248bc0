"""Config: --wyoming tcp://HOST:PORT and --wyoming-zeroconf (flags, env vars, checks)."""

from __future__ import annotations

import argparse

import pytest

from voice_agent.config import Config, add_arguments, tcp_address
from voice_agent.errors import ConfigError


def test_off_by_default() -> None:
    config = Config()
    assert config.wyoming is None and config.wyoming_zeroconf is False


def test_flags_and_env_vars() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--wyoming", "tcp://0.0.0.0:10700", "--wyoming-zeroconf"])
    config = Config.from_sources(args, env={})
    assert config.wyoming == "tcp://0.0.0.0:10700" and config.wyoming_zeroconf is True
    env = {"VOICE_AGENT_WYOMING": "tcp://127.0.0.1:10701", "VOICE_AGENT_WYOMING_ZEROCONF": "1"}
    config = Config.from_sources(parser.parse_args([]), env=env)
    assert config.wyoming == "tcp://127.0.0.1:10701" and config.wyoming_zeroconf is True
    assert "Wyoming" in parser.format_help()


@pytest.mark.parametrize(
    "url",
    ["10700", "tcp://:10700", "tcp://host", "http://host:10700", "tcp://h:99999", "tcp://h:1/x"],
)
def test_anything_but_tcp_host_port_is_refused(url: str) -> None:
    assert tcp_address(url) is None
    with pytest.raises(ConfigError, match="wyoming"):
        Config(wyoming=url)


def test_tcp_address() -> None:
    assert tcp_address("tcp://127.0.0.1:10700") == ("127.0.0.1", 10700)
    assert tcp_address("tcp://[::1]:0") == ("::1", 0)
