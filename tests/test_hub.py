"""hub.py (CommandBus, load_devices) and the LiveSession command hooks."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from tests.helpers.devices import DEVICE_NAMES, DEVICES_TOML, write_devices
from tests.helpers.recorders import EventRecorder
from voice_agent.commands import Command, parse_devices
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import ConfigError
from voice_agent.hub import CommandBus, CommandCallback, load_devices
from voice_agent.live import LiveSession, session_config
from voice_agent.metrics import Metrics
from voice_agent.protocol import CommandEvent, ReplyDone

pytestmark = pytest.mark.timeout(60)

OFF = Command("off", "light.kitchen")


class Calls:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    async def sink(self, device: str, command: Command) -> None:
        self.calls.append((device, command))

    def subscriber(self, name: str) -> CommandCallback:
        async def callback(command: Command) -> None:
            self.calls.append((name, command))

        return callback


# ------------------------------------------------------------------ CommandBus


async def test_publish_reaches_the_sink_only_when_attached() -> None:
    bus, calls = CommandBus(), Calls()
    await bus.publish("speaker-1", OFF)  # nothing attached: dropped
    assert bus.published == 0 and not bus.attached
    bus.attach(calls.sink)
    assert bus.attached
    await bus.publish("speaker-1", OFF)
    await bus.publish("bad/device", OFF)  # never a topic level
    await bus.publish("#", OFF)
    assert calls.calls == [("speaker-1", OFF)]
    assert bus.published == 1
    bus.attach(None)
    await bus.publish("speaker-1", OFF)
    assert len(calls.calls) == 1


async def test_deliver_reaches_subscribers_of_that_device_only() -> None:
    bus, calls = CommandBus(), Calls()
    bus.attach(calls.sink)
    off_a = bus.subscribe("speaker-1", calls.subscriber("a"))
    bus.subscribe("speaker-1", calls.subscriber("b"))
    bus.subscribe("speaker-2", calls.subscriber("c"))
    assert bus.subscribers("speaker-1") == 2
    await bus.deliver("speaker-1", OFF)
    assert calls.calls == [("a", OFF), ("b", OFF)]  # and not the sink: no loop
    off_a()
    off_a()  # twice is harmless
    await bus.deliver("speaker-1", OFF)
    assert calls.calls[-1] == ("b", OFF) and len(calls.calls) == 3
    assert bus.delivered == 3
    await bus.deliver("nobody", OFF)
    assert len(calls.calls) == 3


async def test_failing_callbacks_are_logged_and_do_not_stop_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus, calls = CommandBus(), Calls()

    async def broken(*_: object) -> None:
        raise RuntimeError("boom")

    bus.subscribe("d", broken)
    bus.subscribe("d", calls.subscriber("ok"))
    bus.attach(broken)
    with caplog.at_level(logging.ERROR, logger="voice_agent.hub"):
        await bus.deliver("d", OFF)
        await bus.publish("d", OFF)
    assert calls.calls == [("ok", OFF)]
    assert [r.getMessage() for r in caplog.records] == [
        "command subscriber failed",
        "command sink failed",
    ]


# ----------------------------------------------------------------- load_devices


def test_load_devices(tmp_path: Path) -> None:
    assert load_devices(None) is None
    with pytest.raises(ConfigError, match="not found"):
        load_devices(str(tmp_path / "missing.toml"))
    path = write_devices(tmp_path)
    first = load_devices(str(path))
    assert first is not None and set(first.devices) == DEVICE_NAMES
    assert load_devices(str(path)) is first  # parsed once
    path.write_text(DEVICES_TOML + '\n[devices."fan"]\nactions = ["on"]\n')
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    second = load_devices(str(path))
    assert second is not None and set(second.devices) == DEVICE_NAMES | {"fan"}
    path.write_bytes(b"\xff\xfe not utf-8")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))
    with pytest.raises(ConfigError, match="cannot read"):
        load_devices(str(path))


def test_session_config_adds_the_devices_to_the_prompt(devices_file: Path) -> None:
    config = Config(devices=str(devices_file), system_prompt="Base prompt.")
    sc = session_config(config)
    assert sc.devices is not None and "light.kitchen" in sc.devices.devices
    assert sc.system_prompt is not None
    assert sc.system_prompt.startswith("Base prompt.") and "<command>" in sc.system_prompt
    own = session_config(config, "From the client.")
    assert own.system_prompt is not None and own.system_prompt.startswith("From the client.")
    assert session_config(Config()).devices is None
    assert session_config(Config()).system_prompt is None


# ------------------------------------------------------- LiveSession command hooks


REPLY = (
    'Done. <command>{"action": "off", "target": "light.kitchen"}</command>'
    '<command>{"action": "on", "target": "light.garage"}</command>'
)


def _live(
    rec: EventRecorder, device: str | None, calls: Calls, metrics: Metrics
) -> tuple[LiveSession, ScriptedEngine]:
    engine = ScriptedEngine([REPLY], token_delay=0.001)
    config = session_config(Config(), devices=parse_devices(DEVICES_TOML))
    live = LiveSession(
        engine,
        rec,
        session_id="s1",
        config=config,
        metrics=metrics,
        device=device,
        on_command=calls.sink,
    )
    return live, engine


async def test_live_session_forwards_its_commands_for_a_named_device() -> None:
    rec, calls, metrics = EventRecorder(), Calls(), Metrics()
    live, engine = _live(rec, "speaker-1", calls, metrics)
    try:
        await live.text("turn off the kitchen light")
        await rec.until(lambda ev: any(isinstance(e, CommandEvent) for e in ev))
    finally:
        await live.close()
    kinds = [type(e).__name__ for e in rec.events]
    assert kinds[-2:] == ["ReplyDone", "CommandEvent"]  # after the reply, in order
    assert rec.events[-1] == CommandEvent("off", "light.kitchen", None)
    assert calls.calls == [("speaker-1", OFF)]
    assert metrics.commands_total == 1 and metrics.commands_rejected_total == 1
    prompt = engine.submitted[0][0].system_prompt or ""
    assert "light.kitchen" in prompt


async def test_live_session_without_device_does_not_forward() -> None:
    rec, calls, metrics = EventRecorder(), Calls(), Metrics()
    live, _ = _live(rec, None, calls, metrics)
    try:
        await live.text("turn off the kitchen light")
        await rec.until(lambda ev: any(isinstance(e, CommandEvent) for e in ev))
    finally:
        await live.close()
    assert calls.calls == []  # the client got its event, nothing went to MQTT
    assert any(isinstance(e, ReplyDone) for e in rec.events)


async def test_push_command_and_close_callbacks() -> None:
    rec, calls, metrics = EventRecorder(), Calls(), Metrics()
    live, _ = _live(rec, "speaker-1", calls, metrics)
    closed: list[str] = []
    live.add_close_callback(lambda: closed.append("first"))
    await live.push_command(Command("brightness", "light.kitchen", 30))
    assert rec.events == [CommandEvent("brightness", "light.kitchen", 30)]
    assert calls.calls == []  # pushed commands never go back to the hook
    assert metrics.commands_total == 1
    await live.close()
    await live.close()
    assert closed == ["first"]  # once
    await live.push_command(OFF)
    assert len(rec.events) == 1  # nothing after close
    live.add_close_callback(lambda: closed.append("late"))  # already closed: at once
    assert closed == ["first", "late"]
