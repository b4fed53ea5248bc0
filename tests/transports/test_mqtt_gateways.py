"""Several MQTT gateways (a share group) and conversations in the --db store."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.helpers.postgres import PostgresServer
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.server import running
from voice_agent.store import Store
from voice_agent.transports.mqtt import (
    MqttTransport,
)

from . import mqtt_support
from .mqtt_support import (
    WAIT,
    Broker,
    Listener,
    _ask_many,
    _replies,
    agent,
    cfg,
    echo,
    make_host,
    turns_seen,
    until,
)

pytestmark = pytest.mark.timeout(120)

# the fixtures of mqtt_support that the tests below use
broker = mqtt_support.broker


# ------------------------------------------ several gateways: a share group


async def test_share_group_answers_each_request_once(broker: Broker) -> None:
    n = 12
    config = cfg(broker, mqtt_share_group="gateways")
    e1, e2 = ScriptedEngine(echo), ScriptedEngine(echo)
    async with (
        agent(config, e1) as one,
        agent(config, e2) as two,
        Listener(broker) as client,
    ):
        assert one.client_id != two.client_id
        ids = await _ask_many(client, n)
        await client.wait_for(lambda m: set(ids) <= set(_replies(client)))
        await asyncio.sleep(0.5)  # room for a second answer, were there one
        replies = _replies(client)
        assert sorted(replies) == sorted(ids)  # N replies in all, each request once
        assert one.stats.requests + two.stats.requests == n
        assert one.stats.requests > 0 and two.stats.requests > 0  # both took a share
        assert len(e1.submitted) + len(e2.submitted) == n


async def test_without_a_share_group_every_gateway_answers(broker: Broker) -> None:
    n = 6
    e1, e2 = ScriptedEngine(echo), ScriptedEngine(echo)
    async with (
        agent(cfg(broker, mqtt_client_id="gw-1"), e1) as one,
        agent(cfg(broker, mqtt_client_id="gw-2"), e2) as two,
        Listener(broker) as client,
    ):
        ids = await _ask_many(client, n)
        await client.wait_for(lambda m: len(_replies(client)) >= 2 * n)
        assert sorted(_replies(client)) == sorted(ids * 2)  # every request answered twice
        assert one.stats.requests == two.stats.requests == n


async def test_share_group_replica_leaving(broker: Broker) -> None:
    """A replica that leaves: the others take every request and keep the
    retained status `online`; the last one to leave sets it `offline`."""
    config = cfg(broker, mqtt_share_group="gateways")
    engine = ScriptedEngine(echo)
    await engine.start()
    try:
        async with agent(config, ScriptedEngine(echo)) as stays:
            async with Listener(broker, ["voice_agent/status"]) as status:
                leaving = MqttTransport(config, make_host(config, engine), reconnect_min=0.05)
                await leaving.start()
                await leaving.wait_connected(WAIT)
                await leaving.close()  # publishes `offline`; `stays` answers `online`
                await status.wait_for(lambda m: m.payload == b"offline")
                await until(lambda: stays.stats.status_restored >= 1)
            async with Listener(broker, ["voice_agent/status"]) as late:
                m = await late.wait_for(lambda m: m.topic == "voice_agent/status")
                assert (m.payload, m.retain) == (b"online", True)
            async with Listener(broker) as client:
                ids = await _ask_many(client, 6)
                await client.wait_for(lambda m: set(ids) <= set(_replies(client)))
                assert stays.stats.requests == 6  # none went to the replica that left
        async with Listener(broker, ["voice_agent/status"]) as after:
            m = await after.wait_for(lambda m: m.topic == "voice_agent/status")
            assert (m.payload, m.retain) == (b"offline", True)
    finally:
        await engine.close()


# ------------------------------------------- conversations in the --db store


async def test_a_device_conversation_survives_a_restart(broker: Broker, tmp_path: Path) -> None:
    db = tmp_path / "conversations.db"
    config = Config(host="127.0.0.1", port=0, mqtt=broker.url(), db=str(db))
    async with Listener(broker) as client:
        for i in range(2):  # two runs of the server on one database
            engine = ScriptedEngine()
            engine.replies = turns_seen(engine)
            async with running(config, engine, reconnect_min=0.05) as services:
                assert services.mqtt is not None
                await services.mqtt.wait_connected(WAIT)
                await client.ask("kitchen", {"id": f"q{i}", "text": f"question {i}"})
                reply = await client.reply("kitchen", f"q{i}")
                assert reply["text"] == f"I had {i} turns"
                if i == 1:
                    assert services.mqtt.stats.conversations_loaded == 1
                    conv = engine.submitted[-1][0]
                    assert "question 0" in engine.history_text(conv)
                    # Owned by "mqtt": a WebSocket client cannot resume it.
                    async with RealtimeClient(services.app.url) as ws:
                        started = await ws.start(session_id="mqtt:kitchen")
                        assert started.session_id != "mqtt:kitchen"
    store = Store(db)
    try:
        record = store.load("mqtt:kitchen")
        assert record is not None
        assert (record.owner, record.device, record.history.turns) == ("mqtt", "kitchen", 2)
    finally:
        store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_share_group_keeps_one_history_per_device(
    broker: Broker, tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """Two gateways of one share group on one store: the broker hands a device's
    requests to both in turn, and each turn sees every earlier one."""
    if backend == "sqlite":
        target = str(tmp_path / "conversations.db")
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        target = server.create_database()
    config = cfg(broker, mqtt_share_group="gateways")
    stores = [Store(target), Store(target)]
    e1, e2 = ScriptedEngine(), ScriptedEngine()
    e1.replies, e2.replies = turns_seen(e1), turns_seen(e2)
    n = 6
    try:
        async with (
            agent(config, e1, store=stores[0]) as one,
            agent(config, e2, store=stores[1]) as two,
            Listener(broker) as client,
        ):
            for i in range(n):
                await client.ask("kitchen", {"id": f"q{i}", "text": f"question {i}"})
                reply = await client.reply("kitchen", f"q{i}")
                assert reply["text"] == f"I had {i} turns"
            assert one.stats.requests > 0 and two.stats.requests > 0  # both answered
            assert one.stats.requests + two.stats.requests == n
            assert one.stats.conversations_loaded + two.stats.conversations_loaded >= 1
            last = max(e1.submitted + e2.submitted, key=lambda s: s[0].turns)[0]
            history = (e1 if any(c is last for c, _ in e1.submitted) else e2).history_text(last)
            assert all(f"question {i}" in history for i in range(n))
        assert stores[0].turns_of("mqtt:kitchen") == n
    finally:
        for store in stores:
            store.close()
