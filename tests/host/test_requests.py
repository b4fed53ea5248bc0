"""ConversationHost.start_request / end_request: one-request sessions of a
request/reply transport (MQTT) on a fixed conversation key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.helpers.recorders import EventRecorder
from tests.helpers.stores import MemoryStore
from voice_agent.config import Config
from voice_agent.engine.base import Conversation, TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import BadMessage, Busy
from voice_agent.host import ConversationHost
from voice_agent.protocol import CommandEvent, ReplyDone


class CountingEngine(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__(lambda t: f"heard {0 if t.audio is None else len(t.audio)} {t.text}")
        self.released: list[str] = []

    def release(self, conversation: Conversation) -> None:
        self.released.append(conversation.conversation_id)


async def ask(host: ConversationHost, turn: TurnInput, key: str = "mqtt:kitchen") -> EventRecorder:
    inbox = EventRecorder()
    live, _ = await host.start_request(
        key, inbox.send, owner="mqtt", transport="mqtt", device="kitchen"
    )
    await live.turn(turn)
    await inbox.until_done()
    await live.settled()
    saved = await host.end_request(live)
    assert saved is None or await saved
    return inbox


async def test_a_request_runs_on_its_key_and_keeps_the_kv_cache() -> None:
    engine = CountingEngine()
    store = MemoryStore()
    host = ConversationHost(Config(), engine, store=store)
    host.engine_started()
    clip = np.zeros(8000, dtype=np.float32)
    first = await ask(host, TurnInput(audio=clip, text="what is this?"))
    assert first.of(ReplyDone)[0].text == "heard 8000 what is this?"  # one whole turn, no VAD
    second = await ask(host, TurnInput(text="and now?"))
    assert [d.reply_id for d in second.of(ReplyDone)] == ["r2"]  # numbering carries on
    conversations = [conv for conv, _ in engine.submitted]
    assert conversations[0] is conversations[1]  # kept in memory between requests
    assert conversations[0].conversation_id == "mqtt:kitchen"
    assert engine.released == []  # with its KV cache
    assert not host.sessions and "mqtt:kitchen" in host.conversations.kept
    # one save per request, none on reply.done as well
    assert store.saved == ["mqtt:kitchen", "mqtt:kitchen"]
    record = store.records["mqtt:kitchen"]
    assert (record.owner, record.device, record.ids_used) == ("mqtt", "kitchen", (0, 2))
    await host.close()


async def test_in_use_is_busy_and_an_empty_turn_is_refused() -> None:
    host = ConversationHost(Config(), ScriptedEngine())
    host.engine_started()
    inbox = EventRecorder()
    live, resumed = await host.start_request(
        "mqtt:hall", inbox.send, owner="mqtt", transport="mqtt"
    )
    assert resumed == "new" and host.sessions == {"mqtt:hall": live}
    with pytest.raises(Busy):
        await host.start_request("mqtt:hall", inbox.send, owner="mqtt", transport="mqtt")
    with pytest.raises(BadMessage):
        await live.turn(TurnInput(text="   "))
    await host.end_request(live)
    again, resumed = await host.start_request(
        "mqtt:hall", inbox.send, owner="mqtt", transport="mqtt"
    )
    assert resumed == "memory"
    await host.end_request(again)
    await host.close()


async def test_commands_come_before_settled_returns_and_are_counted_once(
    devices_file: Path,
) -> None:
    reply = (
        'On. <command>{"action": "on", "target": "light.kitchen"}</command>'
        '<command>{"action": "explode", "target": "light.kitchen"}</command>'
    )
    host = ConversationHost(Config(devices=str(devices_file)), ScriptedEngine([reply]))
    host.engine_started()
    inbox = await ask(host, TurnInput(text="light"))
    commands = inbox.of(CommandEvent)
    assert [(c.action, c.target) for c in commands] == [("on", "light.kitchen")]
    assert inbox.events.index(commands[0]) > inbox.events.index(inbox.of(ReplyDone)[0])
    metrics = host.metrics
    assert (metrics.commands_total, metrics.commands_rejected_total) == (1, 1)
    assert metrics.turns_total == 1
    await host.close()
