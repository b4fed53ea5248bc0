"""The MQTT transport against a real mosquitto on a free loopback port.

The broker is started by the `broker` fixture (Debian package `mosquitto`);
when it is missing the tests fail, they are never skipped. Engines: the
scripted one (replies chosen by the test, commands included) and, once, the
tiny real Qwen2-Audio for an audio request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiomqtt
import pytest

from voice_agent.audio import decode
from voice_agent.client import RealtimeClient
from voice_agent.commands import Command
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import BrokerAuthError, ConfigError
from voice_agent.hub import CommandBus, load_devices
from voice_agent.protocol import CommandEvent, ErrorEvent, ReplyDone
from voice_agent.server import running
from voice_agent.store import Store
from voice_agent.transports.mqtt import (
    AnsweredIds,
    MqttTransport,
    RequestError,
    Topics,
    default_client_id,
    parse_broker_url,
    parse_request,
    running_mqtt,
)

from .servers import free_port
from .tls_files import make_tls_files

if TYPE_CHECKING:
    from conftest import PostgresServer

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
WAIT = 30.0  # generous: these machines have 2 cores

DEVICES_TOML = """
[devices."light.kitchen"]
description = "kitchen ceiling light"
actions = ["on", "off"]
brightness = { min = 0, max = 100 }

[devices."climate.living_room"]
set_temperature = { min = 16, max = 28 }
set_mode = { values = ["heat", "cool", "off"] }
"""


# ------------------------------------------------------------------ the broker


class Broker:
    """A mosquitto process on 127.0.0.1:port with persistence in `directory`;
    with `tls` (CA, certificate, key files) the listener speaks TLS only."""

    def __init__(
        self,
        directory: Path,
        users: dict[str, str] | None = None,
        tls: tuple[Path, Path, Path] | None = None,
    ) -> None:
        if not Path(MOSQUITTO).exists():
            pytest.fail("mosquitto is not installed (Debian package `mosquitto`)")
        self.dir = directory
        self.port = free_port()
        self.tls = tls is not None
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"persistence true\npersistence_location {directory}/",
            f"log_dest file {directory}/mosquitto.log",
        ]
        if tls is not None:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if os.geteuid() == 0:
            lines.append("user root")  # keep root: the directory is not the mosquitto user's
        if users:
            passwords = directory / "passwords"
            passwords.write_text("")
            for user, password in users.items():
                subprocess.run(
                    [MOSQUITTO_PASSWD, "-b", str(passwords), user, password],
                    check=True,
                    capture_output=True,
                )
            passwords.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def url(self, userinfo: str = "") -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):  # up to 10 s
            if self.proc.poll() is not None:
                log = (self.dir / "mosquitto.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mosquitto exited with {self.proc.returncode}: {log}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1),
            ):
                return
            time.sleep(0.05)
        pytest.fail("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


# ------------------------------------------------------------ a test client


@dataclass(frozen=True)
class Msg:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Listener:
    """An MQTT client that records every message of `topics`, for assertions."""

    def __init__(
        self,
        broker: Broker,
        topics: Sequence[str] = ("voice_agent/#",),
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.client = aiomqtt.Client(
            "127.0.0.1",
            broker.port,
            identifier=f"test-{uuid.uuid4().hex[:8]}",
            tls_context=tls,
        )
        self.topics = topics
        self.messages: list[Msg] = []
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Listener:
        await self.client.__aenter__()
        await self.client.subscribe([(t, 1) for t in self.topics])
        self._task = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        with contextlib.suppress(aiomqtt.MqttError):
            await self.client.__aexit__(None, None, None)

    async def _read(self) -> None:
        async for m in self.client.messages:
            payload = m.payload if isinstance(m.payload, bytes) else str(m.payload).encode()
            self.messages.append(Msg(str(m.topic), payload, bool(m.retain)))
            self._changed.set()

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1) -> None:
        await self.client.publish(topic, payload, qos=qos)

    async def ask(self, device: str, body: dict[str, Any], prefix: str = "voice_agent") -> None:
        await self.publish(f"{prefix}/{device}/ask", json.dumps(body))

    async def wait_for(self, match: Callable[[Msg], bool], timeout: float = WAIT) -> Msg:
        """The first recorded message that matches (also one already recorded)."""
        async with asyncio.timeout(timeout):
            while True:
                for m in self.messages:
                    if match(m):
                        return m
                self._changed.clear()
                await self._changed.wait()

    async def reply(self, device: str, rid: str, prefix: str = "voice_agent") -> dict[str, Any]:
        topic = f"{prefix}/{device}/reply"
        m = await self.wait_for(lambda m: m.topic == topic and m.json()["id"] == rid)
        body: dict[str, Any] = m.json()
        return body

    async def error(self, device: str, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        topic = f"voice_agent/{device}/error"
        m = await self.wait_for(lambda m: m.topic == topic and match(m.json()))
        body: dict[str, Any] = m.json()
        return body

    def on(self, topic: str) -> list[Msg]:
        return [m for m in self.messages if m.topic == topic]


def cfg(broker: Broker, **kw: Any) -> Config:
    return Config(mqtt=broker.url(), **kw)


@contextlib.asynccontextmanager
async def agent(config: Config, engine: Any, **kw: Any) -> AsyncIterator[MqttTransport]:
    """A started engine and MqttTransport, with a fast reconnect for tests."""
    await engine.start()
    kw.setdefault("reconnect_min", 0.05)
    kw.setdefault("reconnect_max", 0.5)
    async with running_mqtt(config, engine, **kw) as transport:
        await transport.wait_connected(WAIT)
        yield transport
    await engine.close()


def echo(turn: TurnInput) -> str:
    if turn.audio is not None:
        return f"heard {len(turn.audio)} samples" + (f" about {turn.text}" if turn.text else "")
    return f"you said {turn.text}"


async def until(check: Callable[[], bool], timeout: float = WAIT) -> None:
    """Poll a condition of the agent's own state (bounded)."""
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.02)


# ------------------------------------------------------------- pure helpers


def test_broker_url() -> None:
    u = parse_broker_url("mqtts://al%40ice:p%3Ass@broker.lan:8884")
    assert (u.host, u.port, u.tls, u.username, u.password) == (
        "broker.lan",
        8884,
        True,
        "al@ice",
        "p:ss",
    )
    assert "p:ss" not in repr(u)
    assert parse_broker_url("mqtt://h").port == 1883
    assert parse_broker_url("mqtts://h").port == 8883
    for bad in ("http://h:1", "mqtt://:1883", "mqtt://h:99999", "h:1883"):
        with pytest.raises(Exception, match="--mqtt"):
            parse_broker_url(bad)


def test_topics_are_built_from_the_prefix_and_fixed_suffixes() -> None:
    t = Topics("home/voice")
    assert t.status == "home/voice/status"
    assert t.parse("home/voice/kitchen/ask") == ("kitchen", "ask")
    assert t.parse("home/voice/kitchen/ask/audio") == ("kitchen", "ask/audio")
    assert t.parse("home/voice/kitchen/reply") is None
    assert t.parse("other/kitchen/ask") is None
    assert t.parse("home/voice/a/b/ask") is None
    assert t.for_device("kitchen", "command") == "home/voice/kitchen/command"
    for bad in ("a/b", "#", "+", "", "x" * 65, "a b"):
        with pytest.raises(ValueError):
            t.for_device(bad, "command")


def test_parse_request_errors_carry_the_id_when_known() -> None:
    def err(payload: bytes, kind: str = "ask") -> RequestError:
        with pytest.raises(RequestError) as info:
            parse_request("d", kind, payload, max_text_chars=10)
        return info.value

    assert err(b"{nope").request_id is None
    assert err(b"[1]").error.code == "bad_message"
    assert err(b'{"text": "hi"}').request_id is None
    e = err(b'{"id": "7", "audio": "***"}')
    assert (e.request_id, e.error.code) == ("7", "bad_audio")
    assert err(b'{"id": "8"}').request_id == "8"
    assert err(b'{"id": "9", "text": "' + b"x" * 11 + b'"}').error.code == "bad_message"
    assert err(b'{"id": "9", "text": "hi", "session": "a/b"}').error.code == "bad_message"
    assert err(b"", "ask/audio").error.code == "bad_audio"
    ok = parse_request("d", "ask", b'{"id": "1", "text": "hi", "session": "s1"}', max_text_chars=10)
    assert (ok.id, ok.text, ok.audio, ok.session) == ("1", "hi", None, "s1")
    raw = parse_request("d", "ask/audio", b"RIFF", max_text_chars=10)
    assert raw.audio == b"RIFF" and raw.id


def test_answered_ids_are_bounded() -> None:
    ids = AnsweredIds(per_device=2, devices=2)
    ids.add("a", "1")
    ids.add("a", "2")
    ids.add("a", "3")
    assert ("a", "1") not in ids and ("a", "3") in ids
    ids.add("b", "1")
    ids.add("c", "1")
    assert ("a", "2") not in ids and ("c", "1") in ids


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
from voice_agent.transports.mqtt import running_mqtt

async def main():
    engine = ScriptedEngine()
    await engine.start()
    async with running_mqtt(Config(mqtt=sys.argv[1], mqtt_client_id="doomed"), engine) as t:
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


COMMAND_REPLY = "\n".join(
    [
        "Done.",
        '<command>{"action": "off", "target": "light.kitchen"}</command>',
        '<command>{"action": "brightness", "target": "light.kitchen", "value": 40}</command>',
        '<command>{"action": "set_mode", "target": "climate.living_room", "value": "heat"}'
        "</command>",
        # unknown target, out of range, unknown action, wrong value kind
        '<command>{"action": "on", "target": "light.garage"}</command>',
        '<command>{"action": "brightness", "target": "light.kitchen", "value": 140}</command>',
        '<command>{"action": "explode", "target": "light.kitchen"}</command>',
        '<command>{"action": "set_mode", "target": "climate.living_room", "value": "warp"}'
        "</command>",
        # injection attempts: topic names, wildcards, extra JSON
        '<command>{"action": "on", "target": "voice_agent/other/command"}</command>',
        '<command>{"action": "on", "target": "light.kitchen/#"}</command>',
        '<command>{"action": "on", "target": "+"}</command>',
        '<command>{"action": "on", "target": "light.kitchen", "topic": "x/y"}</command>',
        '<command>{"action": "on", "target": "light.kitchen"}, {"a": 1}</command>',
        "<command>not json</command>",
    ]
)
VALID: list[dict[str, Any]] = [
    {"action": "off", "target": "light.kitchen"},
    {"action": "brightness", "target": "light.kitchen", "value": 40},
    {"action": "set_mode", "target": "climate.living_room", "value": "heat"},
]


@pytest.fixture
def devices_file(tmp_path: Path) -> Path:
    path = tmp_path / "devices.toml"
    path.write_text(DEVICES_TOML)
    return path


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
        assert transport.stats.commands_rejected == 10
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


# ------------------------------------------------------- authentication


@pytest.fixture
def auth_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, users={"agent": "s3cret:pw"})
    b.start()
    yield b
    b.stop()


async def test_password_broker_with_and_without_credentials(auth_broker: Broker) -> None:
    good = Config(mqtt=auth_broker.url("agent:s3cret%3Apw"))
    async with agent(good, ScriptedEngine(echo)) as transport:
        assert transport.connected
    for url in (auth_broker.url(), auth_broker.url("agent:wrong")):
        engine = ScriptedEngine()
        await engine.start()
        transport = MqttTransport(Config(mqtt=url), engine)
        with pytest.raises(BrokerAuthError, match="refused the credentials"):
            await transport.start()
        assert not transport.connected
        await engine.close()


def test_cli_exits_with_one_line_without_credentials(
    auth_broker: Broker, tiny_model_dir: Path
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "voice_agent.cli",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--port",
            "0",
            "--mqtt",
            auth_broker.url(),
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    # one line, no traceback (model-loading progress bars may come before it)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "voice-agent" in line]
    assert lines == [
        f"voice-agent: error: the MQTT broker at 127.0.0.1:{auth_broker.port} refused the "
        "credentials (none were given)"
    ], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == lines[0]


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

    from voice_agent.tts.espeak import EspeakTTS
    from voice_agent.tts.speaker import Speech

    from .speech_checks import voiced_fraction

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
    assert m["voice_agent_mqtt_commands_rejected_total"] == 10
    assert m["voice_agent_mqtt_duplicates_total"] == 1
    assert m["voice_agent_mqtt_connected"] == 1
    assert m["voice_agent_tokens_generated_total"] == len(words(COMMAND_REPLY))
    assert m["voice_agent_ttft_seconds_count"] == 1
    assert m['voice_agent_turn_latency_seconds_count{transport="mqtt"}'] == 1
    assert m['voice_agent_queue_depth{queue="mqtt_requests"}'] == 0
    assert 'voice_agent_queue_depth{queue="mqtt_outbox"}' in m
    assert m["voice_agent_sessions_total"] == 0  # the WebSocket side, same registry


# ------------------------------------------ several gateways: a share group


def test_share_group_topics_client_ids_and_config() -> None:
    t = Topics("home/voice", share_group="gw")
    assert t.ask == "$share/gw/home/voice/+/ask"
    assert t.ask_audio == "$share/gw/home/voice/+/ask/audio"
    assert t.status == "home/voice/status"  # published topics stay plain
    assert t.parse("home/voice/kitchen/ask") == ("kitchen", "ask")  # as messages arrive
    assert Topics("home/voice").ask == "home/voice/+/ask"
    assert default_client_id("voice_agent", None) == "voice-agent-voice_agent"
    a, b = default_client_id("voice_agent", "gw"), default_client_id("voice_agent", "gw")
    assert a != b and a.startswith("voice-agent-voice_agent-")
    assert len(default_client_id("x" * 200, "gw")) <= 64
    for bad in ("a/b", "#", "+", "a b", "x" * 65):
        with pytest.raises(ConfigError, match="mqtt_share_group"):
            Config(mqtt_share_group=bad)
    assert Config(mqtt_share_group="").mqtt_share_group == ""  # empty: off


async def _ask_many(client: Listener, n: int) -> list[str]:
    ids = [f"r-{i}" for i in range(n)]
    for i, rid in enumerate(ids):
        await client.ask(f"dev-{i % 3}", {"id": rid, "text": f"question {i}"})
    return ids


def _replies(client: Listener) -> list[str]:
    return [
        m.json()["id"]
        for m in client.messages
        if m.topic.startswith("voice_agent/dev-") and m.topic.endswith("/reply")
    ]


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
                leaving = MqttTransport(config, engine, reconnect_min=0.05)
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


def turns_seen(engine: ScriptedEngine) -> Callable[[TurnInput], str]:
    """Replies that say how many turns of history the conversation had."""
    return lambda turn: f"I had {engine.submitted[-1][0].turns} turns"


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


# ------------------------------------------------------------------ mqtts://


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, tls=make_tls_files(tmp_path / "tls"))
    b.start()
    yield b
    b.stop()


async def test_mqtts_request_and_reply(tls_broker: Broker) -> None:
    ca = tls_broker.dir / "tls" / "ca.pem"
    config = Config(mqtt=tls_broker.url(), mqtt_ca=str(ca))
    assert config.mqtt is not None and config.mqtt.startswith("mqtts://")
    tls = ssl.create_default_context(cafile=str(ca))
    async with (
        agent(config, ScriptedEngine(echo)) as transport,
        Listener(tls_broker, tls=tls) as client,
    ):
        assert transport.url.tls
        await client.ask("kitchen", {"id": "tls-1", "text": "over tls"})
        reply = await client.reply("kitchen", "tls-1")
        assert reply["text"] == "you said over tls"


async def test_mqtts_wrong_ca_is_a_logged_error_and_retried(
    tls_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = tls_broker.url()
    with pytest.raises(ConfigError, match="--mqtt-ca"):
        MqttTransport(Config(mqtt=url, mqtt_ca=str(tmp_path / "missing.pem")), ScriptedEngine())
    other_ca = make_tls_files(tmp_path / "other")[0]  # a CA that did not sign the broker's
    caplog.set_level(logging.INFO, logger="voice_agent.mqtt")
    engine = ScriptedEngine()
    await engine.start()
    transport = MqttTransport(
        Config(mqtt=url, mqtt_ca=str(other_ca)), engine, reconnect_min=0.05, reconnect_max=0.2
    )

    def untrusted() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "not trusted" in r.getMessage()]

    try:
        await transport.start(first_connect_timeout=1.0)  # does not raise: retries
        await until(lambda: len(untrusted()) >= 3)
        assert not transport.connected and transport.stats.connections == 0
        assert transport._task is not None and not transport._task.done()  # still trying
        records = untrusted()
        assert all(r.levelno == logging.ERROR and r.exc_info is None for r in records)
        assert "--mqtt-ca" in records[0].getMessage()
        assert "CERTIFICATE_VERIFY_FAILED" in getattr(records[0], "reason", "")
        assert not any(r.exc_info for r in caplog.records if r.name == "voice_agent.mqtt")
    finally:
        await transport.close()
        await engine.close()
