"""MQTT with WebSocket speakers, the command bus, spoken replies and metrics."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from voice_agent.audio import decode
from voice_agent.client import RealtimeClient
from voice_agent.commands import Command
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.hub import CommandBus
from voice_agent.protocol import CommandEvent, ErrorEvent, ReplyDone
from voice_agent.server import running

from . import mqtt_support
from .mqtt_support import (
    COMMAND_REPLY,
    WAIT,
    Broker,
    Listener,
    agent,
    cfg,
    until,
)

pytestmark = pytest.mark.timeout(120)

# the fixtures of mqtt_support that the tests below use
broker = mqtt_support.broker


# --------------------------------------------- WebSocket speakers and the bus


async def test_speaker_commands_reach_mqtt_and_mqtt_commands_reach_the_speaker(
    broker: Broker, devices_file: Path
) -> None:
    def brain(turn: TurnInput) -> str:
        if "kitchen light" in (turn.text or ""):
            return 'Turning it off. <command>{"action": "off", "target": "light.kitchen"}</command>'
        if "brighter" in (turn.text or ""):
            return (
                '<command>{"action": "brightness", "target": "light.kitchen", "value": 80}'
                "</command> Brighter now."
            )
        return "Hm."

    engine = ScriptedEngine(brain)
    config = Config(host="127.0.0.1", port=0, mqtt=broker.url(), devices=str(devices_file))
    async with (
        running(config, engine, reconnect_min=0.05) as services,
        Listener(broker) as mqtt_client,
    ):
        assert services.mqtt is not None and services.bus.attached
        async with (
            RealtimeClient(services.app.url) as speaker,
            RealtimeClient(services.app.url) as other,
        ):
            await speaker.start(device="speaker-1")
            await other.start(device="speaker-2")
            await speaker.send_text("turn off the kitchen light")
            done = await speaker.wait_for(ReplyDone)
            event = await speaker.wait_for(CommandEvent)
            assert (event.action, event.target, event.value) == ("off", "light.kitchen", None)
            assert "<command>" in done.text
            m = await mqtt_client.wait_for(lambda m: m.topic == "voice_agent/speaker-1/command")
            body = m.json()
            assert (body["action"], body["target"]) == ("off", "light.kitchen")
            assert "value" not in body and body["id"]

            # an MQTT request for speaker-1 with a command: the speaker hears of it too
            await mqtt_client.ask("speaker-1", {"id": "m-1", "text": "brighter"})
            reply = await mqtt_client.reply("speaker-1", "m-1")
            assert reply["commands"] == [
                {"action": "brightness", "target": "light.kitchen", "value": 80}
            ]
            pushed = await speaker.wait_for(CommandEvent)
            assert (pushed.action, pushed.value) == ("brightness", 80)
            assert services.bus.subscribers("speaker-1") == 1
            commands = [m.json() for m in mqtt_client.on("voice_agent/speaker-1/command")]
            assert len(commands) == 2  # the MQTT command was not sent back round
        # the speaker sessions ended: their subscriptions are gone
        await until(lambda: services.bus.subscribers("speaker-1") == 0)
        assert mqtt_client.on("voice_agent/speaker-2/command") == []
        assert other.of_type(CommandEvent) == []


async def test_spoken_command_from_a_speaker(
    broker: Broker, devices_file: Path, tmp_path: Path
) -> None:
    """Real speech (espeak-ng) streamed by a speaker: the utterance reaches the
    engine as audio and its command is published for that speaker."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        pytest.fail("espeak-ng is not installed")
    wav = tmp_path / "say.wav"
    subprocess.run(
        [espeak, "-v", "en-us", "-s", "160", "-w", str(wav), "turn off the kitchen light"],
        check=True,
    )
    speech = decode(wav)
    pcm = (speech * 32767).astype("<i2").tobytes() + bytes(16000 * 2)  # + 1 s of silence
    engine = ScriptedEngine(
        lambda t: (
            '<command>{"action": "off", "target": "light.kitchen"}</command> Off.'
            if t.audio is not None and len(t.audio) > 8000
            else "Hm."
        )
    )
    config = Config(host="127.0.0.1", port=0, mqtt=broker.url(), devices=str(devices_file))
    async with (
        running(config, engine, reconnect_min=0.05) as services,
        Listener(broker) as mqtt_client,
        RealtimeClient(services.app.url) as speaker,
    ):
        await speaker.start(device="speaker-1")
        for i in range(0, len(pcm), 640):
            await speaker.send_audio(pcm[i : i + 640])
        await speaker.commit()
        event = await speaker.wait_for(CommandEvent)
        assert (event.action, event.target) == ("off", "light.kitchen")
        m = await mqtt_client.wait_for(lambda m: m.topic == "voice_agent/speaker-1/command")
        assert m.json()["action"] == "off"


async def test_bad_device_name_in_session_start(broker: Broker) -> None:
    config = Config(host="127.0.0.1", port=0, mqtt=broker.url())
    async with (
        running(config, ScriptedEngine(), reconnect_min=0.05) as services,
        RealtimeClient(services.app.url) as client,
    ):
        await client.send_json({"type": "session.start", "device": "a/#"})
        err = await client.wait_for(ErrorEvent)
        assert err.code == "bad_message" and client.session is None


async def test_running_publishes_offline_on_shutdown(broker: Broker) -> None:
    config = Config(host="127.0.0.1", port=0, mqtt=broker.url())
    async with Listener(broker, ["voice_agent/status"]) as client:
        async with running(config, ScriptedEngine(), reconnect_min=0.05):
            await client.wait_for(lambda m: m.payload == b"online")
        m = await client.wait_for(lambda m: m.payload == b"offline")
        assert m.topic == "voice_agent/status"


async def test_publish_command_from_the_bus(broker: Broker) -> None:
    bus = CommandBus()
    async with agent(cfg(broker), ScriptedEngine(), bus=bus), Listener(broker) as client:
        await bus.publish("speaker-9", Command("on", "light.kitchen"))
        await bus.publish("bad/name", Command("on", "light.kitchen"))  # dropped
        m = await client.wait_for(lambda m: m.topic.endswith("/command"))
        assert m.topic == "voice_agent/speaker-9/command"
        assert {k: v for k, v in m.json().items() if k != "id"} == {
            "action": "on",
            "target": "light.kitchen",
        }
    assert not bus.attached


async def test_spoken_reply_is_a_wav_on_reply_audio(broker: Broker) -> None:
    import io

    import soundfile

    from tests.helpers.speech import voiced_fraction
    from voice_agent.tts.espeak import EspeakTTS
    from voice_agent.tts.speaker import Speech

    text = "The kitchen light is on. The hall stays dark, as you asked."
    speech = Speech(EspeakTTS())
    engine = ScriptedEngine([text], token_delay=0.01)
    try:
        async with agent(cfg(broker), engine, speech=speech), Listener(broker) as client:
            await client.ask("kitchen", {"id": "s-1", "text": "lights"})
            reply = await client.reply("kitchen", "s-1")
            audio = await client.wait_for(lambda m: m.topic == "voice_agent/kitchen/reply/audio")
            topics = [m.topic for m in client.messages if m.topic.startswith("voice_agent/kitchen")]
    finally:
        speech.close()
    assert reply["text"] == text
    assert topics.index("voice_agent/kitchen/reply") < topics.index(
        "voice_agent/kitchen/reply/audio"
    )
    assert audio.payload[:4] == b"RIFF" and audio.payload[8:12] == b"WAVE"
    data, rate = soundfile.read(io.BytesIO(audio.payload), dtype="int16")
    assert rate == 22050 and data.ndim == 1
    assert len(data) / rate > 2.5  # both sentences
    assert voiced_fraction(data.tobytes(), rate) > 0.4


async def test_no_reply_audio_without_speech(broker: Broker) -> None:
    engine = ScriptedEngine(["Fine."], token_delay=0.01)
    async with agent(cfg(broker), engine), Listener(broker) as client:
        await client.ask("kitchen", {"id": "n-1", "text": "hi"})
        await client.reply("kitchen", "n-1")
        await asyncio.sleep(0.5)
        assert client.on("voice_agent/kitchen/reply/audio") == []


# ------------------------------------------------------------------- metrics


async def test_mqtt_feeds_the_servers_metrics(broker: Broker, devices_file: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from voice_agent.engine.scripted import words

    engine = ScriptedEngine(lambda t: COMMAND_REPLY if "light" in (t.text or "") else "Hi.")
    config = Config(
        host="127.0.0.1",
        port=0,
        mqtt=broker.url(),
        devices=str(devices_file),
        turn_detection="silence",
    )
    async with (
        running(config, engine, reconnect_min=0.05) as services,
        Listener(broker) as client,
    ):
        mqtt = services.mqtt
        assert mqtt is not None
        assert mqtt.metrics is services.app.metrics  # one registry: one /metrics for both
        await mqtt.wait_connected(WAIT)
        await client.ask("kitchen", {"id": "m-1", "text": "the light please"})
        await client.reply("kitchen", "m-1")
        await client.ask("kitchen", {"id": "m-1", "text": "the light please"})  # repeated
        await until(lambda: mqtt.stats.duplicates == 1)
        text = services.app.metrics.render().decode()
    m = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            m[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    assert m["voice_agent_mqtt_requests_total"] == 1
    assert m["voice_agent_mqtt_replies_total"] == 1
    assert m["voice_agent_mqtt_commands_published_total"] == 3
    assert m["voice_agent_commands_rejected_total"] == 10  # by the Session, as WebSocket's
    assert m["voice_agent_commands_total"] == 3
    assert m["voice_agent_turns_total"] == 1
    assert m["voice_agent_mqtt_duplicates_total"] == 1
    assert m["voice_agent_mqtt_connected"] == 1
    assert m["voice_agent_tokens_generated_total"] == len(words(COMMAND_REPLY))
    assert m["voice_agent_ttft_seconds_count"] == 1
    assert m['voice_agent_turn_latency_seconds_count{transport="mqtt"}'] == 1
    assert m['voice_agent_queue_depth{queue="mqtt_requests"}'] == 0
    assert 'voice_agent_queue_depth{queue="mqtt_outbox"}' in m
    assert m["voice_agent_sessions_total"] == 1  # the request's one-turn session
    assert m["voice_agent_sessions_active"] == 0
