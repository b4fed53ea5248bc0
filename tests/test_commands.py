"""commands.py (pure): the devices file, the prompt text, parsing and validation;
and what Session does with the commands of a finished reply."""

from __future__ import annotations

import pytest

from voice_agent.commands import (
    MAX_COMMAND_CHARS,
    MAX_COMMANDS,
    ActionSpec,
    Command,
    DeviceList,
    parse_commands,
    parse_devices,
    prompt_text,
    valid_device_name,
)
from voice_agent.engine.base import Timing, TurnResult, Usage
from voice_agent.errors import ConfigError
from voice_agent.protocol import CommandEvent, ReplyDone, ReplyStarted
from voice_agent.session import Send, Session, SessionConfig, SubmitTurn

DEVICES = """
[devices."light.kitchen"]
description = "kitchen ceiling light"
actions = ["on", "off"]
brightness = { min = 0, max = 100 }

[devices."climate.living_room"]
set_temperature = { min = 16.5, max = 28 }
set_mode = { values = ["heat", "cool", "off"] }
"""


@pytest.fixture
def devices() -> DeviceList:
    return parse_devices(DEVICES)


def cmd(body: str) -> str:
    return f"<command>{body}</command>"


# ----------------------------------------------------------- the devices file


def test_parse_devices(devices: DeviceList) -> None:
    assert len(devices) == 2
    kitchen = devices.devices["light.kitchen"]
    assert kitchen.description == "kitchen ceiling light"
    assert set(kitchen.actions) == {"on", "off", "brightness"}
    assert kitchen.actions["on"] == ActionSpec("on")
    assert kitchen.actions["brightness"] == ActionSpec("brightness", "number", 0, 100, True)
    climate = devices.devices["climate.living_room"]
    assert climate.actions["set_temperature"].integer is False  # 16.5 is not an integer
    assert climate.actions["set_mode"].choices == ("heat", "cool", "off")
    assert climate.description == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not = [toml", "not valid TOML"),
        ("", "needs a"),
        ("[other]\nx = 1", "needs a"),
        ('[devices."light/kitchen"]\nactions = ["on"]', "must match"),
        ('[devices."light.#"]\nactions = ["on"]', "must match"),
        ('[devices."+"]\nactions = ["on"]', "must match"),
        ('devices = { "a" = 1 }', "expected a table"),
        ('[devices."a"]\ndescription = 3\nactions = ["on"]', "description"),
        ('[devices."a"]\nactions = "on"', "list of names"),
        ('[devices."a"]\nactions = ["turn on"]', "must match"),
        ('[devices."a"]\nactions = ["on/#"]', "must match"),
        ('[devices."a"]\ndescription = "nothing to do"', "no actions"),
        ('[devices."a"]\nlevel = 5', "must be a table"),
        ('[devices."a"]\nlevel = { min = 5, max = 1 }', "min <= max"),
        ('[devices."a"]\nlevel = { min = 0 }', "min <= max"),
        ('[devices."a"]\nlevel = { min = true, max = 3 }', "min <= max"),
        ('[devices."a"]\nlevel = { min = 0, max = 1, step = 1 }', "unknown keys"),
        ('[devices."a"]\nmode = { values = [] }', "non-empty list"),
        ('[devices."a"]\nmode = { values = [1, 2] }', "non-empty list"),
    ],
)
def test_parse_devices_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_devices(text)


def test_device_names() -> None:
    assert valid_device_name("speaker-1") and valid_device_name("a_B-9")
    for bad in ("", "a/b", "#", "+", "a b", "x" * 65, "kitchen/#", "a.b"):
        assert not valid_device_name(bad), bad


# ------------------------------------------------------------------ the prompt


def test_prompt_lists_devices_and_the_format(devices: DeviceList) -> None:
    text = prompt_text(devices, "You are Jarvis.")
    assert text.startswith("You are Jarvis.\n")
    assert (
        "- light.kitchen (kitchen ceiling light): on; off; brightness (value: an integer "
        "from 0 to 100)" in text
    )
    assert "set_temperature (value: a number from 16.5 to 28)" in text
    assert "set_mode (value: one of heat, cool, off)" in text
    assert '<command>{"action": "ACTION", "target": "DEVICE", "value": VALUE}</command>' in text
    assert prompt_text(devices).startswith("You are a helpful assistant.\n")


# ------------------------------------------------------------------- parsing


def test_valid_commands(devices: DeviceList) -> None:
    text = "\n".join(
        [
            "Sure, done.",
            cmd('{"action": "off", "target": "light.kitchen"}'),
            cmd('{"action": "brightness", "target": "light.kitchen", "value": 40.0}'),
            cmd('{"target": "climate.living_room", "action": "set_temperature", "value": 21.5}'),
            cmd(' {"action": "set_mode", "target": "climate.living_room", "value": "cool"} '),
            cmd('{"action": "brightness", "target": "light.kitchen", "value": 0}'),
            cmd('{"action": "brightness", "target": "light.kitchen", "value": 100}'),
        ]
    )
    parsed = parse_commands(text, devices)
    assert parsed.rejected == ()
    assert parsed.commands == (
        Command("off", "light.kitchen"),
        Command("brightness", "light.kitchen", 40),
        Command("set_temperature", "climate.living_room", 21.5),
        Command("set_mode", "climate.living_room", "cool"),
        Command("brightness", "light.kitchen", 0),
        Command("brightness", "light.kitchen", 100),
    )
    assert isinstance(parsed.commands[1].value, int)  # integer range: an int
    assert parsed.commands[0].to_json() == {"action": "off", "target": "light.kitchen"}
    assert parsed.commands[1].to_json()["value"] == 40


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"action": "on", "target": "light.garage"}', "unknown_target"),
        ('{"action": "on", "target": "LIGHT.KITCHEN"}', "unknown_target"),
        ('{"action": "dim", "target": "light.kitchen"}', "unknown_action"),
        ('{"action": "brightness", "target": "light.kitchen", "value": 101}', "out_of_range"),
        ('{"action": "brightness", "target": "light.kitchen", "value": -1}', "out_of_range"),
        (
            '{"action": "set_temperature", "target": "climate.living_room", "value": 16}',
            "out_of_range",
        ),
        (
            '{"action": "set_mode", "target": "climate.living_room", "value": "warp"}',
            "out_of_range",
        ),
        ('{"action": "brightness", "target": "light.kitchen", "value": 40.5}', "bad_value"),
        ('{"action": "brightness", "target": "light.kitchen", "value": "40"}', "bad_value"),
        ('{"action": "brightness", "target": "light.kitchen", "value": true}', "bad_value"),
        ('{"action": "brightness", "target": "light.kitchen"}', "bad_value"),
        ('{"action": "brightness", "target": "light.kitchen", "value": NaN}', "bad_value"),
        ('{"action": "brightness", "target": "light.kitchen", "value": Infinity}', "bad_value"),
        ('{"action": "on", "target": "light.kitchen", "value": 1}', "bad_value"),
        ('{"action": "set_mode", "target": "climate.living_room", "value": 1}', "bad_value"),
        ('{"action": "on"}', "bad_fields"),
        ('{"action": 1, "target": "light.kitchen"}', "bad_fields"),
        ('{"action": "on", "target": ["light.kitchen"]}', "bad_fields"),
        ("turn it on", "bad_json"),
        ('["on", "light.kitchen"]', "bad_json"),
        ("", "bad_json"),
        # injection attempts: a topic as target, wildcards, extra JSON, extra fields
        ('{"action": "on", "target": "voice_agent/kitchen/command"}', "unknown_target"),
        ('{"action": "on", "target": "light.kitchen/#"}', "unknown_target"),
        ('{"action": "on", "target": "#"}', "unknown_target"),
        ('{"action": "on", "target": "+"}', "unknown_target"),
        ('{"action": "on/../off", "target": "light.kitchen"}', "unknown_action"),
        ('{"action": "on", "target": "light.kitchen", "topic": "home/other"}', "bad_fields"),
        ('{"action": "on", "target": "light.kitchen", "device": "speaker-2"}', "bad_fields"),
        ('{"action": "on", "target": "light.kitchen"} {"action": "off"}', "bad_json"),
        ('{"action": "on", "target": "light.kitchen"}, {"x": 1}', "bad_json"),
        ("[" * 100000, "too_long"),
        (
            '{"action": "on", "target": "light.kitchen", "x": "' + "a" * MAX_COMMAND_CHARS + '"}',
            "too_long",
        ),
    ],
)
def test_rejected_commands(devices: DeviceList, body: str, reason: str) -> None:
    parsed = parse_commands(f"Okay. {cmd(body)} Done.", devices)
    assert parsed.commands == ()
    assert [r.reason for r in parsed.rejected] == [reason]


def test_only_the_valid_commands_of_a_mixed_reply(devices: DeviceList) -> None:
    text = " ".join(
        [
            cmd('{"action": "on", "target": "light.garage"}'),
            cmd('{"action": "on", "target": "light.kitchen"}'),
            cmd('{"action": "brightness", "target": "light.kitchen", "value": 400}'),
            cmd('{"action": "on", "target": "light.kitchen", "topic": "x/#"}'),
            cmd('{"action": "set_mode", "target": "climate.living_room", "value": "heat"}'),
        ]
    )
    parsed = parse_commands(text, devices)
    assert parsed.commands == (
        Command("on", "light.kitchen"),
        Command("set_mode", "climate.living_room", "heat"),
    )
    assert [r.reason for r in parsed.rejected] == ["unknown_target", "out_of_range", "bad_fields"]


def test_text_without_the_exact_tags_is_never_a_command(devices: DeviceList) -> None:
    for text in (
        'I would send {"action": "on", "target": "light.kitchen"} but I will not.',
        '<command {"action": "on", "target": "light.kitchen"}</command>',
        '<COMMAND>{"action": "on", "target": "light.kitchen"}</COMMAND>',
        '<command>{"action": "on", "target": "light.kitchen"}',  # never closed
        "",
    ):
        parsed = parse_commands(text, devices)
        assert parsed.commands == () and parsed.rejected == (), text


def test_nested_tags_do_not_smuggle_a_command(devices: DeviceList) -> None:
    text = cmd('{"action": "on", "target": "' + cmd("x") + '"}')
    parsed = parse_commands(text, devices)
    assert parsed.commands == ()
    assert len(parsed.rejected) == 1


def test_at_most_max_commands(devices: DeviceList) -> None:
    one = cmd('{"action": "on", "target": "light.kitchen"}')
    parsed = parse_commands(one * (MAX_COMMANDS + 3), devices)
    assert len(parsed.commands) == MAX_COMMANDS
    assert [r.reason for r in parsed.rejected] == ["too_many"] * 3


# ------------------------------------------------- Session: commands of a reply


def _reply(session: Session, text: str, *, cancelled: bool = False) -> list[object]:
    actions = session.text("please")
    started = next(a.event for a in actions if isinstance(a, Send))
    assert isinstance(started, ReplyStarted)
    assert any(isinstance(a, SubmitTurn) for a in actions)
    return list(session.on_done(started.reply_id, TurnResult(text, Usage(), Timing(), cancelled)))


def test_session_sends_command_events_after_reply_done(devices: DeviceList) -> None:
    session = Session("s", SessionConfig(devices=devices))
    text = (
        "Off it goes. "
        + cmd('{"action": "off", "target": "light.kitchen"}')
        + cmd('{"action": "on", "target": "light.garage"}')
        + cmd('{"action": "brightness", "target": "light.kitchen", "value": 101}')
        + cmd('{"action": "brightness", "target": "light.kitchen", "value": 5}')
    )
    events = [a.event for a in _reply(session, text) if isinstance(a, Send)]
    assert isinstance(events[0], ReplyDone) and events[0].text == text
    assert events[1:] == [
        CommandEvent("off", "light.kitchen", None),
        CommandEvent("brightness", "light.kitchen", 5),
    ]
    assert session.rejected_commands == {"unknown_target": 1, "out_of_range": 1}


def test_session_without_devices_or_cancelled_reply_sends_no_commands(
    devices: DeviceList,
) -> None:
    text = cmd('{"action": "off", "target": "light.kitchen"}')
    plain = Session("s")
    assert not any(
        isinstance(a, Send) and isinstance(a.event, CommandEvent) for a in _reply(plain, text)
    )
    with_devices = Session("s", SessionConfig(devices=devices))
    cancelled = _reply(with_devices, text, cancelled=True)
    assert not any(isinstance(a, Send) and isinstance(a.event, CommandEvent) for a in cancelled)
