"""MQTT requests on a real mosquitto: status, will, text and audio, histories, commands."""

from __future__ import annotations

import asyncio
import base64
import signal
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT
from voice_agent.audio import decode
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.hub import load_devices

from . import mqtt_support
from .mqtt_support import (
    COMMAND_REPLY,
    VALID,
    WAIT,
    Broker,
    Listener,
    agent,
    cfg,
    echo,
)

pytestmark = pytest.mark.timeout(120)

# the fixtures of mqtt_support that the tests below use
broker = mqtt_support.broker


# ---------------------------------------------------------------- the broker


async def test_status_online_retained_and_offline_on_clean_shutdown(broker: Broker) -> None:
    async with agent(cfg(broker), ScriptedEngine()) as transport:
        assert transport.connected
        # A client that subscribes later still gets the retained `online`.
        async with Listener(broker, ["voice_agent/status", "homeassistant/#"]) as late:
            m = await late.wait_for(lambda m: m.topic == "voice_agent/status")
            assert (m.payload, m.retain) == (b"online", True)
            disc = await late.wait_for(lambda m: m.topic.startswith("homeassistant/"))
            assert disc.json()["state_topic"] == "voice_agent/status"
            assert disc.retain
    async with Listener(broker, ["voice_agent/status"]) as after:
        m = await after.wait_for(lambda m: m.topic == "voice_agent/status")
        assert (m.payload, m.retain) == (b"offline", True)


AGENT_SCRIPT = """
import asyncio, sys
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.host import ConversationHost
from voice_agent.transports.mqtt import running_mqtt

async def main():
    engine = ScriptedEngine()
    await engine.start()
    config = Config(mqtt=sys.argv[1], mqtt_client_id="doomed")
    host = ConversationHost(config, engine)
    host.engine_started()
    async with running_mqtt(config, host) as t:
        await t.wait_connected(30)
        print("connected", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_last_will_offline_when_the_agent_dies(broker: Broker) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT_SCRIPT,
        broker.url(),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), WAIT)
        assert line.strip() == b"connected"
        async with Listener(broker, ["voice_agent/status"]) as listener:
            await listener.wait_for(lambda m: m.payload == b"online")
            proc.send_signal(signal.SIGKILL)  # no DISCONNECT: the broker sends the will
            m = await listener.wait_for(lambda m: m.payload == b"offline")
            assert m.topic == "voice_agent/status"
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
    async with Listener(broker, ["voice_agent/status"]) as late:  # and it is retained
        m = await late.wait_for(lambda m: m.topic == "voice_agent/status")
        assert (m.payload, m.retain) == (b"offline", True)


async def test_text_request_streams_deltas_then_the_reply(broker: Broker) -> None:
    engine = ScriptedEngine(["Hello there, how can I help?"], token_delay=0.01)
    async with agent(cfg(broker), engine), Listener(broker) as client:
        await client.ask("kitchen", {"id": "r-1", "text": "hello"})
        reply = await client.reply("kitchen", "r-1")
        assert reply["text"] == "Hello there, how can I help?"
        assert reply["commands"] == []
        assert set(reply["timing"]) >= {"queue_ms", "ttft_ms", "total_ms", "request_ms"}
        topics = [m.topic for m in client.messages if m.topic.startswith("voice_agent/kitchen/")]
        deltas = client.on("voice_agent/kitchen/reply/delta")
        assert len(deltas) == 6 and all(d.json()["id"] == "r-1" for d in deltas)
        assert "".join(d.json()["text"] for d in deltas) == reply["text"]
        # every delta came before the reply
        assert topics.index("voice_agent/kitchen/reply") > max(
            i for i, t in enumerate(topics) if t.endswith("/delta")
        )
        assert engine.submitted[0][1].text == "hello"


async def test_audio_requests_base64_and_raw_file(broker: Broker, audio_dir: Path) -> None:
    engine = ScriptedEngine(echo)
    wav = (audio_dir / "ldc93s1-16k-mono.wav").read_bytes()
    flac = (audio_dir / "librispeech-1272-128104-0000.flac").read_bytes()
    async with agent(cfg(broker), engine), Listener(broker) as client:
        await client.ask(
            "hall", {"id": "a-1", "audio": base64.b64encode(wav).decode(), "text": "what?"}
        )
        reply = await client.reply("hall", "a-1")
        # 2.92 s at 16 kHz reached the engine decoded, with the instruction
        n_wav = len(decode(audio_dir / "ldc93s1-16k-mono.wav"))
        assert n_wav > 40000 and reply["text"] == f"heard {n_wav} samples about what?"
        deltas = [d.json() for d in client.on("voice_agent/hall/reply/delta")]
        assert deltas and {d["id"] for d in deltas} == {"a-1"}

        await client.publish("voice_agent/hall/ask/audio", flac)
        m = await client.wait_for(
            lambda m: m.topic == "voice_agent/hall/reply" and m.json()["id"] != "a-1"
        )
        raw = m.json()
        n_flac = len(decode(audio_dir / "librispeech-1272-128104-0000.flac"))
        assert raw["id"] and raw["text"] == f"heard {n_flac} samples"
        raw_deltas = [
            d.json()
            for d in client.on("voice_agent/hall/reply/delta")
            if d.json()["id"] == raw["id"]
        ]
        assert "".join(d["text"] for d in raw_deltas) == raw["text"]


async def test_audio_request_on_the_tiny_real_model(
    broker: Broker, tiny_model_dir: Path, audio_dir: Path
) -> None:
    engine = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=8, temperature=0.0)
    wav = (audio_dir / "ldc93s1-16k-mono.wav").read_bytes()
    async with agent(cfg(broker, max_new_tokens=8), engine), Listener(broker) as client:
        await client.ask("den", {"id": "t-1", "audio": base64.b64encode(wav).decode()})
        reply = await client.reply(
            "den",
            "t-1",
        )
        deltas = [d.json() for d in client.on("voice_agent/den/reply/delta")]
        assert deltas, "the tiny model streamed no delta"
        assert {d["id"] for d in deltas} == {"t-1"}
        assert "".join(d["text"] for d in deltas) == reply["text"]
        assert reply["timing"]["total_ms"] > 0


async def test_each_device_has_its_own_history(broker: Broker) -> None:
    engine = ScriptedEngine(echo)
    async with agent(cfg(broker), engine), Listener(broker) as client:
        await client.ask("kitchen", {"id": "1", "text": "kitchen one"})
        await client.ask("hall", {"id": "1", "text": "hall one"})
        await client.ask("kitchen", {"id": "2", "text": "kitchen two"})
        await client.ask("kitchen", {"id": "3", "text": "other session", "session": "s2"})
        for device, rid in (("kitchen", "1"), ("hall", "1"), ("kitchen", "2"), ("kitchen", "3")):
            await client.reply(device, rid)
        by_text = {turn.text: conv for conv, turn in engine.submitted}
        kitchen = by_text["kitchen one"]
        assert by_text["kitchen two"] is kitchen
        assert by_text["hall one"] is not kitchen
        assert by_text["other session"] not in (kitchen, by_text["hall one"])
        history = engine.history_text(kitchen)
        assert "kitchen one" in history and "kitchen two" in history
        assert "hall one" not in history and "other session" not in history
        assert kitchen.turns == 2


async def test_only_valid_commands_are_published(broker: Broker, devices_file: Path) -> None:
    engine = ScriptedEngine(lambda t: COMMAND_REPLY if "light" in (t.text or "") else "Hi.")
    devices = load_devices(str(devices_file))
    config = cfg(broker, devices=str(devices_file))
    async with (
        agent(config, engine, devices=devices) as transport,
        Listener(broker, ["#"]) as client,
    ):
        await client.ask("kitchen", {"id": "c-1", "text": "the light please"})
        reply = await client.reply("kitchen", "c-1")
        assert reply["commands"] == VALID
        await client.ask("kitchen", {"id": "c-2", "text": "nothing"})
        assert (await client.reply("kitchen", "c-2"))["commands"] == []
        commands = [m.json() for m in client.on("voice_agent/kitchen/command")]
        assert commands == [{"id": "c-1", **c} for c in VALID]
        assert transport.stats.commands == 3
        # rejected by the Session, counted where the WebSocket sessions count theirs
        assert transport.metrics.commands_rejected_total == 10
        # nothing reached any topic outside the ones the agent builds itself
        allowed = {
            "voice_agent/status",
            "voice_agent/kitchen/ask",
            "voice_agent/kitchen/reply",
            "voice_agent/kitchen/reply/delta",
            "voice_agent/kitchen/command",
        }
        seen = {m.topic for m in client.messages if not m.topic.startswith("homeassistant/")}
        assert seen <= allowed and "voice_agent/kitchen/command" in seen
        # the system prompt listed the devices and the format
        prompt = engine.submitted[0][0].system_prompt or ""
        assert "light.kitchen" in prompt and "<command>" in prompt
