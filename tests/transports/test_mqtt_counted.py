"""What MQTT shares with the WebSocket sessions on /metrics: rejected commands
and errors by code are counted in the same families."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import ReplyDone
from voice_agent.server import running

from . import mqtt_support
from .mqtt_support import COMMAND_REPLY, WAIT, Broker, Listener

pytestmark = pytest.mark.timeout(120)

broker = mqtt_support.broker


def _brain(turn: object) -> str:
    return COMMAND_REPLY  # 3 valid commands, 10 invalid ones


async def test_rejected_commands_are_counted_alike_for_mqtt_and_websocket(
    broker: Broker, devices_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Both turns run through LiveSession/Session: one parser, one count."""
    caplog.set_level(logging.WARNING, logger="voice_agent.live")
    config = Config(host="127.0.0.1", port=0, mqtt=broker.url(), devices=str(devices_file))
    async with (
        running(config, ScriptedEngine(_brain), reconnect_min=0.05) as services,
        Listener(broker) as client,
    ):
        mqtt = services.mqtt
        assert mqtt is not None
        await mqtt.wait_connected(WAIT)
        metrics = services.app.metrics
        assert metrics.commands_rejected_total == 0
        await client.ask("kitchen", {"id": "c-1", "text": "the light"})
        reply = await client.reply("kitchen", "c-1")
        assert len(reply["commands"]) == 3
        over_mqtt = metrics.commands_rejected_total
        assert over_mqtt == 10
        async with RealtimeClient(services.app.url) as speaker:
            await speaker.start(device="speaker-1")
            await speaker.send_text("the light")
            await speaker.wait_for(ReplyDone)
        # the same reply over a WebSocket session adds as much to the same counter
        assert metrics.commands_rejected_total == 2 * over_mqtt
    dropped = [r for r in caplog.records if r.getMessage() == "invalid commands dropped"]
    sessions = [getattr(r, "session_id", "") for r in dropped]
    assert len(dropped) == 2 and sessions[0] == "mqtt:kitchen"  # the MQTT request's session
    assert [getattr(r, "dropped", 0) for r in dropped] == [10, 10]


async def test_mqtt_errors_are_counted_by_code(broker: Broker) -> None:
    config = Config(host="127.0.0.1", port=0, mqtt=broker.url())
    async with (
        running(config, ScriptedEngine(), reconnect_min=0.05) as services,
        Listener(broker) as client,
    ):
        mqtt = services.mqtt
        assert mqtt is not None
        await mqtt.wait_connected(WAIT)
        metrics = services.app.metrics
        assert metrics.errors_total == 0
        await client.publish("voice_agent/kitchen/ask", b"{not json")
        await client.error("kitchen", lambda e: e["code"] == "bad_message")
        await client.publish("voice_agent/kitchen/ask/audio", b"")
        await client.error("kitchen", lambda e: e["code"] == "bad_audio")
        text = metrics.render().decode()
    assert 'voice_agent_errors_total{code="bad_message"} 1.0' in text
    assert 'voice_agent_errors_total{code="bad_audio"} 1.0' in text
    assert metrics.errors_total == 2
    # reported through the host: counted for the transport by code
    assert metrics.errors_of("mqtt", "bad_message") == metrics.errors_of("mqtt", "bad_audio") == 1
