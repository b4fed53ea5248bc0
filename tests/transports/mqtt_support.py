"""Shared by the MQTT tests (test_mqtt_*.py): a real mosquitto on a free
loopback port (`broker`, `auth_broker`, `tls_broker` fixtures; Debian package
`mosquitto`: when it is missing the tests fail, they are never skipped), a
recording test client, and the agent under test: an MqttTransport on its own
ConversationHost (the devices file is the `devices_file` fixture of
tests/conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from tests.helpers.mosquitto import (
    as_root_lines,
    require_mosquitto,
    start_mosquitto,
    stop_mosquitto,
    write_passwords,
)
from tests.helpers.ports import free_port
from tests.helpers.tls import make_tls_files
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.host import ConversationHost
from voice_agent.transports.mqtt import MqttTransport, running_mqtt

WAIT = 30.0  # generous: these machines have 2 cores


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
        require_mosquitto()
        self.dir = directory
        self.port = free_port()
        self.tls = tls is not None
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            f"listener {self.port} 127.0.0.1",
            f"persistence true\npersistence_location {directory}/",
            f"log_dest file {directory}/mosquitto.log",
            *as_root_lines(),
        ]
        if tls is not None:
            ca, cert, key = tls
            lines += [f"cafile {ca}", f"certfile {cert}", f"keyfile {key}"]
        if users:
            passwords = write_passwords(directory / "passwords", users)
            lines += ["allow_anonymous false", f"password_file {passwords}"]
        else:
            lines.append("allow_anonymous true")
        self.conf = directory / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    def url(self, userinfo: str = "") -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        return f"{scheme}://{userinfo + '@' if userinfo else ''}127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = start_mosquitto(self.conf, self.port, self.dir / "mosquitto.log")

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.proc is not None:
            stop_mosquitto(self.proc)
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


def make_host(config: Config, engine: Any, **kw: Any) -> ConversationHost:
    """The host of one agent under test (store, speech, bus, devices, metrics
    as ConversationHost takes them)."""
    return ConversationHost(config, engine, **kw)


@contextlib.asynccontextmanager
async def agent(
    config: Config,
    engine: Any,
    *,
    reconnect_min: float = 0.05,
    reconnect_max: float = 0.5,
    **host_kw: Any,
) -> AsyncIterator[MqttTransport]:
    """A started engine, its ConversationHost (`host_kw`: store, speech, bus,
    devices) and an MqttTransport on it (`transport.host`), with a fast
    reconnect for tests; the host is closed (saves done) on the way out."""
    await engine.start()
    host = make_host(config, engine, **host_kw)
    host.engine_started()
    try:
        async with running_mqtt(
            config, host, reconnect_min=reconnect_min, reconnect_max=reconnect_max
        ) as transport:
            await transport.wait_connected(WAIT)
            yield transport
    finally:
        await host.close()
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
def auth_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, users={"agent": "s3cret:pw"})
    b.start()
    yield b
    b.stop()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path, tls=make_tls_files(tmp_path / "tls"))
    b.start()
    yield b
    b.stop()


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


def turns_seen(engine: ScriptedEngine) -> Callable[[TurnInput], str]:
    """Replies that say how many turns of history the conversation had."""
    return lambda turn: f"I had {engine.submitted[-1][0].turns} turns"
