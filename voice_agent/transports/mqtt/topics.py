"""MQTT topics and the broker URL: pure, no I/O.

Every topic is built from the prefix, a validated device name and fixed
suffixes; nothing a model or a client writes can name a topic."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from voice_agent.commands import valid_device_name as valid_device
from voice_agent.errors import ConfigError

# The owner of MQTT conversations in the store: never "" (no tokens) nor a token
# hash (32 hex digits), so a WebSocket client cannot resume one.
STORE_OWNER = "mqtt"


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never logged


def parse_broker_url(url: str) -> BrokerUrl:
    """mqtt://[user:pass@]host[:port] or mqtts://...; ConfigError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError("--mqtt must look like mqtt://[user:pass@]host:port or mqtts://...")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError("--mqtt: the port is not a number 1..65535") from None
    if not parts.hostname:
        raise ConfigError("--mqtt: no host in the broker URL")
    tls = parts.scheme == "mqtts"
    user = unquote(parts.username) if parts.username is not None else None
    password = unquote(parts.password) if parts.password is not None else None
    return BrokerUrl(parts.hostname, port or (8883 if tls else 1883), tls, user, password)


class Topics:
    """Every topic the agent uses; built from the prefix and fixed suffixes only.

    `ask` and `ask_audio` are the subscription filters: with a share group,
    `$share/GROUP/...` shared subscriptions. Messages received through them
    carry the plain topic (PREFIX/DEVICE/ask), which `parse` reads."""

    def __init__(self, prefix: str, share_group: str | None = None) -> None:
        self.prefix = prefix
        self.status = f"{prefix}/status"
        share = f"$share/{share_group}/" if share_group else ""
        self.ask = f"{share}{prefix}/+/ask"
        self.ask_audio = f"{share}{prefix}/+/ask/audio"
        node = re.sub(r"[^A-Za-z0-9_-]", "_", prefix)
        self.node = node
        self.discovery = f"homeassistant/binary_sensor/{node}/status/config"

    def for_device(self, device: str, suffix: str) -> str:
        if not valid_device(device):  # never reached with a bad name; belt and braces
            raise ValueError("invalid device name")
        return f"{self.prefix}/{device}/{suffix}"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(device, "ask" | "ask/audio") for a request topic, else None."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head) :].split("/")
        if len(rest) == 2 and rest[1] == "ask":
            return rest[0], "ask"
        if len(rest) == 3 and rest[1:] == ["ask", "audio"]:
            return rest[0], "ask/audio"
        return None


def store_id(device: str, session: str | None) -> str:
    """The store's session_id of a device's conversation: `mqtt:DEVICE` or
    `mqtt:DEVICE:SESSION`. WebSocket sessions are hex uuids, so never collide."""
    return f"mqtt:{device}" + (f":{session}" if session else "")


def default_client_id(node: str, share_group: str | None) -> str:
    """voice-agent-NODE; with a share group, a random suffix per process, since
    replicas started from one configuration must not share a client id (the
    broker would disconnect one whenever the other connects)."""
    base = f"voice-agent-{node}"
    if not share_group:
        return base[:64]
    return f"{base[:55]}-{uuid.uuid4().hex[:8]}"
