"""MQTT delivery: repeated ids, broker restarts, requests while away, malformed payloads, busy."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable

import pytest

from voice_agent.engine.scripted import ScriptedEngine

from . import mqtt_support
from .mqtt_support import (
    Broker,
    Listener,
    Msg,
    agent,
    cfg,
    echo,
    until,
)

pytestmark = pytest.mark.timeout(120)

# the fixtures of mqtt_support that the tests below use
broker = mqtt_support.broker


async def test_a_request_id_is_answered_once(broker: Broker) -> None:
    engine = ScriptedEngine(echo)
    async with agent(cfg(broker), engine) as transport, Listener(broker) as client:
        await client.ask("kitchen", {"id": "dup", "text": "first"})
        await client.reply("kitchen", "dup")
        await client.ask("kitchen", {"id": "dup", "text": "again"})
        await client.ask("hall", {"id": "dup", "text": "other device, same id"})
        await client.ask("kitchen", {"id": "next", "text": "next"})
        # requests of one device are answered in order: had the duplicate been
        # answered, its reply would have come before this one
        await client.reply("kitchen", "next")
        await client.reply("hall", "dup")
        replies = [m.json()["id"] for m in client.on("voice_agent/kitchen/reply")]
        assert replies == ["dup", "next"]
        assert transport.stats.duplicates == 1
        assert [t.text for _, t in engine.submitted].count("again") == 0


async def test_broker_restart_mid_conversation(broker: Broker) -> None:
    engine = ScriptedEngine(echo)
    async with agent(cfg(broker), engine) as transport:
        async with Listener(broker) as client:
            await client.ask("kitchen", {"id": "1", "text": "before"})
            await client.reply("kitchen", "1")
        await asyncio.to_thread(broker.stop)
        await until(lambda: not transport.connected)
        await asyncio.to_thread(broker.start)  # same port, persistence on
        await until(lambda: transport.connected and transport.stats.connections == 2)
        async with Listener(broker) as client:
            await client.ask("kitchen", {"id": "2", "text": "after"})
            reply = await client.reply("kitchen", "2")
            assert reply["text"] == "you said after"
            status = await client.wait_for(lambda m: m.topic == "voice_agent/status")
            assert status.payload == b"online"
        conv = engine.submitted[-1][0]
        assert engine.submitted[0][0] is conv and conv.turns == 2  # same conversation
        assert "before" in engine.history_text(conv)


async def test_requests_sent_while_the_agent_is_away_are_delivered(broker: Broker) -> None:
    config = cfg(broker, mqtt_client_id="agent-persistent")
    engine = ScriptedEngine(echo)
    async with agent(config, engine):
        pass  # the broker now holds the agent's persistent session and subscriptions
    async with Listener(broker) as client:
        await client.ask("kitchen", {"id": "while-away", "text": "are you there"})
        async with agent(config, ScriptedEngine(echo)) as transport:
            reply = await client.reply("kitchen", "while-away")
            assert reply["text"] == "you said are you there"
            assert transport.stats.requests == 1


async def test_malformed_payloads_get_errors_and_the_agent_keeps_serving(
    broker: Broker,
) -> None:
    engine = ScriptedEngine(echo)
    config = cfg(broker, mqtt_max_payload=4096)
    async with agent(config, engine) as transport, Listener(broker) as client:
        await client.publish("voice_agent/kitchen/ask", b"not json {")
        e = await client.error("kitchen", lambda e: e["id"] is None)
        assert e["code"] == "bad_message"

        await client.ask("kitchen", {"id": "b64", "audio": "%%% not base64 %%%"})
        e = await client.error("kitchen", lambda e: e["id"] == "b64")
        assert e["code"] == "bad_audio"

        noise = base64.b64encode(b"these bytes are not audio" * 10).decode()
        await client.ask("kitchen", {"id": "noise", "audio": noise})
        e = await client.error("kitchen", lambda e: e["id"] == "noise")
        assert e["code"] == "bad_audio" and "noise" not in e["message"]

        await client.publish("voice_agent/kitchen/ask/audio", b"\x00\x01junk" * 50)
        e = await client.error(
            "kitchen", lambda e: e["code"] == "bad_audio" and e["id"] not in ("b64", "noise")
        )
        assert e["id"]  # a generated id

        await client.publish("voice_agent/kitchen/ask", b"x" * 5000)
        e = await client.error("kitchen", lambda e: "larger" in e["message"])
        assert e["code"] == "bad_message" and e["id"] is None

        await client.ask("kitchen", {"id": "no-text"})
        await client.error("kitchen", lambda e: e["id"] == "no-text")
        await client.publish("voice_agent/bad.name/ask", b'{"id": "x", "text": "hi"}')

        await client.ask("kitchen", {"id": "ok", "text": "still there?"})
        assert (await client.reply("kitchen", "ok"))["text"] == "you said still there?"
        assert transport.stats.errors == 6
        assert transport.stats.ignored == 1
        assert [t.text for _, t in engine.submitted] == ["still there?"]
        assert not any(
            m.topic.startswith("voice_agent/bad.name/") and m.topic != "voice_agent/bad.name/ask"
            for m in client.messages
        )


async def test_busy_when_too_many_requests_wait(broker: Broker) -> None:
    engine = ScriptedEngine(echo, token_delay=0.05)
    config = cfg(broker, max_queued_utterances=1)
    async with agent(config, engine) as transport, Listener(broker) as client:
        ids = [f"q{i}" for i in range(4)]
        for rid in ids:
            await client.ask("kitchen", {"id": rid, "text": rid})
        outcome: dict[str, str] = {}
        answers = ("voice_agent/kitchen/reply", "voice_agent/kitchen/error")

        def answer_to(rid: str) -> Callable[[Msg], bool]:
            return lambda m: m.topic in answers and m.json()["id"] == rid

        for rid in ids:  # each request gets a reply or an error
            outcome[rid] = (await client.wait_for(answer_to(rid))).topic.rsplit("/", 1)[1]
        got = [m.json()["id"] for m in client.messages if m.topic in answers]
        assert sorted(got) == ids  # never both, never twice
        refused = [rid for rid in ids if outcome[rid] == "error"]
        assert outcome["q0"] == "reply" and refused
        assert transport.stats.busy == len(refused)
        errors = [m.json() for m in client.on("voice_agent/kitchen/error")]
        assert {e["code"] for e in errors} == {"busy"}
        # a refused id is not remembered: sent again, it is answered
        await client.ask("kitchen", {"id": refused[0], "text": "retry"})
        reply = await client.reply("kitchen", refused[0])
        assert reply["text"] == "you said retry"
