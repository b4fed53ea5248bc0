"""MQTT on the conversation host: saves through the host's one SaveQueue,
errors reported by code, admission refusals, turns through the Session."""

from __future__ import annotations

import pytest

from tests.helpers.stores import MemoryStore
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine

from . import mqtt_support
from .mqtt_support import Broker, Listener, agent, cfg, echo, until

pytestmark = pytest.mark.timeout(120)

broker = mqtt_support.broker


async def test_each_request_is_saved_through_the_hosts_save_queue(broker: Broker) -> None:
    store = MemoryStore()
    async with (
        agent(cfg(broker), ScriptedEngine(echo), store=store) as transport,
        Listener(broker) as client,
    ):
        host = transport.host
        for i in range(3):
            await client.ask("kitchen", {"id": f"s{i}", "text": f"question {i}"})
            await client.reply("kitchen", f"s{i}")
        await host.saves.wait_saved()
        stats = host.saves.stats
        # one save per request (a pending one may be replaced by the next), none lost
        assert stats.saved + stats.replaced == 3
        assert (stats.errors, stats.dropped) == (0, 0)
        assert store.saved == ["mqtt:kitchen"] * stats.saved
        record = store.records["mqtt:kitchen"]
        assert (record.owner, record.device, record.history.turns) == ("mqtt", "kitchen", 3)
        assert record.ids_used == (0, 3)  # replies r1..r3 of one conversation
        # the conversation is kept between requests, not held by a session
        assert "mqtt:kitchen" in host.conversations.kept
        assert not host.conversations.in_use("mqtt:kitchen") and not host.sessions


async def test_a_store_that_is_down_does_not_stop_the_replies(broker: Broker) -> None:
    store = MemoryStore()
    store.fail = True
    async with (
        agent(cfg(broker), ScriptedEngine(echo), store=store) as transport,
        Listener(broker) as client,
    ):
        saves = transport.host.saves
        await client.ask("hall", {"id": "d-1", "text": "while it is down"})
        assert (await client.reply("hall", "d-1"))["text"] == "you said while it is down"
        await saves.wait_saved()
        assert saves.stats.errors >= 1 and saves.stats.saved == 0  # counted by the host
        store.fail = False
        await client.ask("hall", {"id": "d-2", "text": "and now"})
        assert (await client.reply("hall", "d-2"))["text"] == "you said and now"
        await saves.wait_saved()
        assert saves.stats.saved == 1
        assert store.records["mqtt:hall"].history.turns == 2  # the next save carried both


async def test_errors_are_reported_to_the_host_by_code(broker: Broker) -> None:
    def brain(turn: TurnInput) -> str:
        if turn.text == "fail":
            raise RuntimeError("the model broke")  # the engine's EngineError: code internal
        return "fine"

    async with (
        agent(cfg(broker), ScriptedEngine(brain)) as transport,
        Listener(broker) as client,
    ):
        metrics = transport.metrics
        await client.publish("voice_agent/kitchen/ask", b"{not json")
        await client.error("kitchen", lambda e: e["code"] == "bad_message")
        await client.publish("voice_agent/kitchen/ask/audio", b"")
        await client.error("kitchen", lambda e: e["code"] == "bad_audio")
        await client.ask("kitchen", {"id": "e-1", "text": "fail"})
        failed = await client.error("kitchen", lambda e: e["id"] == "e-1")
        assert failed["code"] == "internal" and "broke" not in failed["message"]
        await client.ask("kitchen", {"id": "e-2", "text": "and now?"})
        assert (await client.reply("kitchen", "e-2"))["text"] == "fine"
        # host.report (transport errors) and the session's metrics, labelled mqtt
        assert metrics.errors_of("mqtt", "bad_message") == 1
        assert metrics.errors_of("mqtt", "bad_audio") == 1
        assert metrics.errors_of("mqtt", "internal") == 1
        assert metrics.errors_of("realtime", "internal") == 0
        assert metrics.errors_total == 3
        assert transport.stats.errors == 3


async def test_admission_refusals_carry_their_code_and_may_be_sent_again(
    broker: Broker,
) -> None:
    async with (
        agent(cfg(broker, max_sessions=1), ScriptedEngine(echo)) as transport,
        Listener(broker) as client,
    ):
        host, metrics = transport.host, transport.metrics
        ticket = host.admission.admit()  # another session holds the only place
        await client.ask("kitchen", {"id": "a-1", "text": "full?"})
        full = await client.error("kitchen", lambda e: e["id"] == "a-1")
        assert full["code"] == "server_full"
        ticket.release()
        await client.ask("kitchen", {"id": "a-1", "text": "now?"})  # the id was forgotten
        assert (await client.reply("kitchen", "a-1"))["text"] == "you said now?"
        assert host.admission.open == 0  # the request's place was given back

        host.admission.loading = True  # as before the engine has started
        await client.ask("kitchen", {"id": "a-2", "text": "loading?"})
        loading = await client.error("kitchen", lambda e: e["id"] == "a-2")
        assert loading["code"] == "loading" and "loading" in loading["message"]
        host.engine_started()
        await client.ask("kitchen", {"id": "a-2", "text": "loaded"})
        assert (await client.reply("kitchen", "a-2"))["text"] == "you said loaded"

        host.begin_shutdown()
        await client.ask("kitchen", {"id": "a-3", "text": "bye?"})
        bye = await client.error("kitchen", lambda e: e["id"] == "a-3")
        assert bye["code"] == "shutting_down"
        for code in ("server_full", "loading", "shutting_down"):
            assert metrics.errors_of("mqtt", code) == 1
            assert host.admission.refused[code] == 1


async def test_a_busy_engine_fails_the_turn_through_the_session(broker: Broker) -> None:
    engine = ScriptedEngine(echo, max_queue=0)  # refuses every turn with Busy
    async with agent(cfg(broker), engine) as transport, Listener(broker) as client:
        await client.ask("den", {"id": "b-1", "text": "anyone?"})
        err = await client.error("den", lambda e: e["id"] == "b-1")
        assert err["code"] == "busy"
        assert transport.metrics.errors_of("mqtt", "busy") == 1
        await until(lambda: not transport.host.sessions)
        assert transport.stats.replies == 0
