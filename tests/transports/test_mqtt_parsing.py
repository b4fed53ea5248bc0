"""MQTT pure parts: broker URLs, topics, request parsing, answered ids, share groups."""

from __future__ import annotations

import pytest

from voice_agent.config import Config
from voice_agent.errors import ConfigError
from voice_agent.transports.mqtt import (
    AnsweredIds,
    RequestError,
    Topics,
    default_client_id,
    parse_broker_url,
    parse_request,
)

from . import mqtt_support

pytestmark = pytest.mark.timeout(120)

# the fixtures of mqtt_support that the tests below use
broker = mqtt_support.broker


# ------------------------------------------------------------- pure helpers


def test_broker_url() -> None:
    u = parse_broker_url("mqtts://al%40ice:p%3Ass@broker.lan:8884")
    assert (u.host, u.port, u.tls, u.username, u.password) == (
        "broker.lan",
        8884,
        True,
        "al@ice",
        "p:ss",
    )
    assert "p:ss" not in repr(u)
    assert parse_broker_url("mqtt://h").port == 1883
    assert parse_broker_url("mqtts://h").port == 8883
    for bad in ("http://h:1", "mqtt://:1883", "mqtt://h:99999", "h:1883"):
        with pytest.raises(Exception, match="--mqtt"):
            parse_broker_url(bad)


def test_topics_are_built_from_the_prefix_and_fixed_suffixes() -> None:
    t = Topics("home/voice")
    assert t.status == "home/voice/status"
    assert t.parse("home/voice/kitchen/ask") == ("kitchen", "ask")
    assert t.parse("home/voice/kitchen/ask/audio") == ("kitchen", "ask/audio")
    assert t.parse("home/voice/kitchen/reply") is None
    assert t.parse("other/kitchen/ask") is None
    assert t.parse("home/voice/a/b/ask") is None
    assert t.for_device("kitchen", "command") == "home/voice/kitchen/command"
    for bad in ("a/b", "#", "+", "", "x" * 65, "a b"):
        with pytest.raises(ValueError):
            t.for_device(bad, "command")


def test_parse_request_errors_carry_the_id_when_known() -> None:
    def err(payload: bytes, kind: str = "ask") -> RequestError:
        with pytest.raises(RequestError) as info:
            parse_request("d", kind, payload, max_text_chars=10)
        return info.value

    assert err(b"{nope").request_id is None
    assert err(b"[1]").error.code == "bad_message"
    assert err(b'{"text": "hi"}').request_id is None
    e = err(b'{"id": "7", "audio": "***"}')
    assert (e.request_id, e.error.code) == ("7", "bad_audio")
    assert err(b'{"id": "8"}').request_id == "8"
    assert err(b'{"id": "9", "text": "' + b"x" * 11 + b'"}').error.code == "bad_message"
    assert err(b'{"id": "9", "text": "hi", "session": "a/b"}').error.code == "bad_message"
    assert err(b"", "ask/audio").error.code == "bad_audio"
    ok = parse_request("d", "ask", b'{"id": "1", "text": "hi", "session": "s1"}', max_text_chars=10)
    assert (ok.id, ok.text, ok.audio, ok.session) == ("1", "hi", None, "s1")
    raw = parse_request("d", "ask/audio", b"RIFF", max_text_chars=10)
    assert raw.audio == b"RIFF" and raw.id


def test_answered_ids_are_bounded() -> None:
    ids = AnsweredIds(per_device=2, devices=2)
    ids.add("a", "1")
    ids.add("a", "2")
    ids.add("a", "3")
    assert ("a", "1") not in ids and ("a", "3") in ids
    ids.add("b", "1")
    ids.add("c", "1")
    assert ("a", "2") not in ids and ("c", "1") in ids


def test_share_group_topics_client_ids_and_config() -> None:
    t = Topics("home/voice", share_group="gw")
    assert t.ask == "$share/gw/home/voice/+/ask"
    assert t.ask_audio == "$share/gw/home/voice/+/ask/audio"
    assert t.status == "home/voice/status"  # published topics stay plain
    assert t.parse("home/voice/kitchen/ask") == ("kitchen", "ask")  # as messages arrive
    assert Topics("home/voice").ask == "home/voice/+/ask"
    assert default_client_id("voice_agent", None) == "voice-agent-voice_agent"
    a, b = default_client_id("voice_agent", "gw"), default_client_id("voice_agent", "gw")
    assert a != b and a.startswith("voice-agent-voice_agent-")
    assert len(default_client_id("x" * 200, "gw")) <= 64
    for bad in ("a/b", "#", "+", "a b", "x" * 65):
        with pytest.raises(ConfigError, match="mqtt_share_group"):
            Config(mqtt_share_group=bad)
    assert Config(mqtt_share_group="").mqtt_share_group == ""  # empty: off
