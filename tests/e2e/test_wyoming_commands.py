"""Home Assistant's Wyoming conversation agent (conversation.py's event
sequence, tests/e2e/wyoming_support.py) on a server with `--mqtt` on a real
mosquitto and the `--devices` allowlist: the commands of a handled reply are
validated and published on PREFIX/DEVICE/command and sent to the WebSocket
speakers of the satellite that asked, and a conversation id keeps its history
(in the --db store too, across a restart).

A scripted engine writes the replies (the tiny model's noise would never
hold a valid command); every path it stands in for runs on the tiny model
in test_wyoming_services.py.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.wyoming_support import handle, handled_text, wyoming_server
from tests.transports import mqtt_support
from tests.transports.mqtt_support import COMMAND_REPLY, VALID, Broker, Listener
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

broker = mqtt_support.broker  # the fixture: a mosquitto on a free port


def _commands(client: Listener) -> list[dict[str, object]]:
    return [
        m.json()
        for m in client.messages
        if m.topic.startswith("voice_agent/") and m.topic.endswith("/command")
    ]


async def test_a_handled_turn_publishes_its_valid_commands(
    broker: Broker, devices_file: Path
) -> None:
    """The reply holds 3 valid and 11 invalid commands: `handled` carries the
    reply, the 3 valid ones (and only those) reach the broker."""
    engine = ScriptedEngine(
        lambda t: COMMAND_REPLY if "kitchen" in (t.text or "") else "Nothing to do."
    )
    fields: dict[str, Any] = {"mqtt": broker.url(), "devices": str(devices_file)}
    fields["max_new_tokens"] = 256  # the whole scripted reply
    async with wyoming_server(engine, **fields) as server, Listener(broker) as client:
        events = await handle(server, "turn off the kitchen light", "01J000KITCHEN")
        text = handled_text(events)
        assert "Done." in text
        assert "<command" not in text and "action" not in text, text  # HA speaks this text
        async with asyncio.timeout(mqtt_support.WAIT):
            while len(_commands(client)) < len(VALID):
                await asyncio.sleep(0.05)
        # a plain reply publishes nothing; it also flushes what the first one sent
        handled_text(await handle(server, "hello", "01J000KITCHEN"))
        await asyncio.sleep(0.5)
        published = _commands(client)
    got = sorted(json.dumps({k: v for k, v in c.items() if k != "id"}) for c in published)
    assert got == sorted(json.dumps(c) for c in VALID), published
    topics = {m.topic for m in client.messages if m.topic.endswith("/command")}
    assert len(topics) == 1, topics  # one device: the one that asked


async def test_a_conversation_id_keeps_its_history(devices_file: Path) -> None:
    """Each Home Assistant conversation id is one conversation: its second
    turn comes after its first; another id starts afresh."""
    engine = ScriptedEngine()

    def turns_seen(turn: TurnInput) -> str:
        return f"I had {engine.submitted[-1][0].turns} turns"

    engine.replies = turns_seen
    async with wyoming_server(engine, devices=str(devices_file)) as server:
        first = handled_text(await handle(server, "one", "01J000AAAA"))
        second = handled_text(await handle(server, "two", "01J000AAAA"))
        other = handled_text(await handle(server, "one", "01J000BBBB"))
    assert first == "I had 0 turns", first
    assert second == "I had 1 turns", second
    assert other == "I had 0 turns", other


async def test_a_failed_turn_is_not_handled(devices_file: Path) -> None:
    """An engine failure answers not-handled (or an error) with a text Home
    Assistant can show; the next turn works."""

    def brain(turn: TurnInput) -> str:
        if "fail" in (turn.text or ""):
            raise RuntimeError("the model broke")
        return "Fine."

    async with wyoming_server(ScriptedEngine(brain), devices=str(devices_file)) as server:
        events = await handle(server, "please fail", "01J000FAIL")
        assert events and events[-1].type in ("not-handled", "error"), events
        assert isinstance(events[-1].data.get("text"), str), events[-1].data
        assert "the model broke" not in json.dumps(events[-1].data)  # no exception text
        assert handled_text(await handle(server, "and now?", "01J000FAIL")) == "Fine."


async def test_a_satellites_commands_reach_its_websocket_speaker(devices_file: Path) -> None:
    """Home Assistant's context names the satellite (device_id): the reply's
    command goes to the WebSocket sessions of that device, and only those."""
    from voice_agent.client import RealtimeClient
    from voice_agent.protocol import CommandEvent

    reply = 'Off. <command>{"action": "off", "target": "light.kitchen"}</command>'
    engine = ScriptedEngine([reply])
    async with wyoming_server(engine, devices=str(devices_file), max_new_tokens=256) as server:
        url = server.services.app.url
        async with RealtimeClient(url) as speaker, RealtimeClient(url) as other:
            await speaker.start(device="satellite-1")
            await other.start(device="satellite-2")
            events = await handle(server, "lights off", "01J000SAT", device_id="satellite-1")
            handled_text(events)
            async with asyncio.timeout(mqtt_support.WAIT):
                event = await speaker.wait_for(CommandEvent)
            assert (event.action, event.target, event.value) == ("off", "light.kitchen", None)
            await asyncio.sleep(0.3)
            assert other.of_type(CommandEvent) == []


async def test_a_conversation_survives_a_restart(devices_file: Path, tmp_path: Path) -> None:
    """With a --db store, a Home Assistant conversation id goes on after the
    server restarts: its next turn comes after the stored ones."""
    engine = ScriptedEngine()
    engine.replies = lambda turn: f"I had {engine.submitted[-1][0].turns} turns"
    fields: dict[str, Any] = {"devices": str(devices_file), "db": str(tmp_path / "conv.db")}
    async with wyoming_server(engine, **fields) as server:
        assert handled_text(await handle(server, "one", "01J000KEPT")) == "I had 0 turns"
        assert handled_text(await handle(server, "two", "01J000KEPT")) == "I had 1 turns"
    again = ScriptedEngine()  # a new process's engine: the history comes from the store
    again.replies = lambda turn: f"I had {again.submitted[-1][0].turns} turns"
    async with wyoming_server(again, **fields) as server:
        assert handled_text(await handle(server, "three", "01J000KEPT")) == "I had 2 turns"
        assert handled_text(await handle(server, "one", "01J000OTHER")) == "I had 0 turns"
