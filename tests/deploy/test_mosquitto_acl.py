"""deploy/mosquitto/: the broker's ACL does what it says, on a real mosquitto."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

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

from .files import DEPLOY


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    """deploy/mosquitto/mosquitto.conf on a loopback port, with deploy/mosquitto/acl as
    is and a password file for the agent, Home Assistant and two devices."""
    require_mosquitto()
    users = ("voice_agent", "homeassistant", "kitchen", "hall")
    passwd = write_passwords(tmp_path / "passwd", {user: f"pw-{user}" for user in users})
    port = free_port()
    lines = []
    for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        key = line.split(None, 1)[0] if line.strip() else ""
        replaced = {
            "listener": f"listener {port} 127.0.0.1",
            "password_file": f"password_file {passwd}",
            "acl_file": f"acl_file {DEPLOY / 'mosquitto' / 'acl'}",
            "persistence_location": f"persistence_location {tmp_path}/",
            "log_dest": f"log_dest file {tmp_path}/mosquitto.log",
        }
        lines.append(replaced.get(key, line))
    lines += as_root_lines()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = start_mosquitto(conf, port, tmp_path / "mosquitto.log")
    try:
        yield port
    finally:
        stop_mosquitto(proc)


def client(port: int, user: str | None) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=f"pw-{user}" if user else None,
        identifier=f"{user}-{uuid.uuid4().hex[:8]}",
    )


async def first_message(c: aiomqtt.Client) -> tuple[str, bytes]:
    async with asyncio.timeout(10):
        async for message in c.messages:
            return str(message.topic), bytes(message.payload)  # type: ignore[arg-type]
    raise AssertionError("no message")


async def test_mosquitto_acl_lets_each_user_use_only_its_topics(broker: int) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, None):
            pass  # anonymous: refused
    async with (
        client(broker, "voice_agent") as agent,
        client(broker, "kitchen") as kitchen,
        client(broker, "homeassistant") as ha,
    ):
        await agent.subscribe("voice_agent/+/ask", qos=1)
        # a device asks only as itself: the forged request is dropped, its own arrives
        await kitchen.publish("voice_agent/hall/ask", b"forged", qos=1)
        await kitchen.publish("voice_agent/kitchen/ask", b"real", qos=1)
        assert await first_message(agent) == ("voice_agent/kitchen/ask", b"real")
        # Home Assistant asks on behalf of any device
        await ha.publish("voice_agent/doorbell/ask", b"ding", qos=1)
        assert await first_message(agent) == ("voice_agent/doorbell/ask", b"ding")

        # a device hears only its own replies and commands, and only the agent's
        for topic in ("voice_agent/hall/reply", "voice_agent/kitchen/reply"):
            await kitchen.subscribe(topic, qos=1)
        await kitchen.subscribe("voice_agent/kitchen/command", qos=1)
        await agent.publish("voice_agent/hall/reply", b"not yours", qos=1)
        await ha.publish("voice_agent/kitchen/command", b"forged by ha", qos=1)
        await agent.publish("voice_agent/kitchen/command", b"light on", qos=1)
        assert await first_message(kitchen) == ("voice_agent/kitchen/command", b"light on")

        # the agent publishes its Home Assistant discovery, which Home Assistant reads
        await ha.subscribe("homeassistant/#", qos=1)
        await agent.publish("homeassistant/binary_sensor/voice_agent/status/config", b"{}", qos=1)
        assert await first_message(ha) == (
            "homeassistant/binary_sensor/voice_agent/status/config",
            b"{}",
        )
