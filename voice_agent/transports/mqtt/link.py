"""The broker link: the aiomqtt client, TLS, connect with backoff, the online
status and Home Assistant discovery, and the bounded outbox with its pump.

It knows topics and payloads only as bytes: what the messages mean is the
transport's (transport.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt.types import SocketOption

from voice_agent.config import Config
from voice_agent.errors import BrokerAuthError, ConfigError

from .stats import MqttStats
from .topics import BrokerUrl, Topics

logger = logging.getLogger("voice_agent.mqtt")

# Outgoing messages waiting for the broker: about a minute of replies of a busy
# house while the broker is away; when full the oldest is dropped (counted).
MAX_OUTBOX = 4096
# Incoming messages aiomqtt keeps before we read them (it drops beyond it).
MAX_INCOMING = 1024
# Seconds between keepalive pings: a dead broker is noticed within ~1.5x this.
KEEPALIVE_S = 15
# CONNACK refusals that mean "wrong or missing credentials" (MQTT 3.1.1 and 5)
_AUTH_CODES = {4, 5, 134, 135}


# TCP_NODELAY on the broker connection (aiomqtt's public socket_options). paho
# leaves Nagle on, so each small publish behind an unacknowledged one waited for
# the broker's delayed ACK (about 40 ms per reply on loopback).
NO_DELAY: tuple[SocketOption, ...] = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


def _refused(code: object) -> bool:
    """A SUBACK failure: a paho ReasonCode that says so, or a code >= 0x80."""
    failure = getattr(code, "is_failure", None)
    if isinstance(failure, bool):
        return failure
    value = getattr(code, "value", code)
    return isinstance(value, int) and value >= 0x80


def _auth_refused(exc: aiomqtt.MqttError) -> bool:
    rc = getattr(exc, "rc", None)
    value = getattr(rc, "value", rc)
    return isinstance(value, int) and value in _AUTH_CODES


def _untrusted(exc: aiomqtt.MqttError) -> bool:
    """The broker's TLS certificate failed verification (wrong CA, wrong host
    name, expired). aiomqtt keeps only the message of the ssl error."""
    text = str(exc)
    return "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text


def tls_context(config: Config) -> ssl.SSLContext:
    """The TLS context of mqtts://: the broker is verified against --mqtt-ca (the
    system's CAs when unset), host name included; --mqtt-cert/--mqtt-key are the
    client certificate. Built once, so unreadable files are a ConfigError at start."""
    if config.mqtt_key and not config.mqtt_cert:
        raise ConfigError("--mqtt-key needs --mqtt-cert")
    try:
        context = ssl.create_default_context(cafile=config.mqtt_ca or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--mqtt-ca {config.mqtt_ca}: cannot load it ({exc})") from None
    if config.mqtt_cert:
        try:
            context.load_cert_chain(config.mqtt_cert, config.mqtt_key or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--mqtt-cert {config.mqtt_cert}: cannot load the client certificate ({exc})"
            ) from None
    return context


@dataclass(frozen=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


class BrokerLink:
    """One logical connection to the broker, reconnected with exponential
    backoff; `on_message` gets every message received (on the loop)."""

    def __init__(
        self,
        url: BrokerUrl,
        topics: Topics,
        client_id: str,
        *,
        share_group: str | None,
        tls: ssl.SSLContext | None,
        discovery: Callable[[], bytes],
        on_message: Callable[[aiomqtt.Message], None],
        stats: MqttStats,
        reconnect_min: float,
        reconnect_max: float,
        max_outbox: int = MAX_OUTBOX,
        keepalive: int = KEEPALIVE_S,
    ) -> None:
        self.url = url
        self.topics = topics
        self.client_id = client_id
        self.share_group = share_group
        self._tls = tls
        self._discovery = discovery
        self._on_message = on_message
        self.stats = stats
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.max_outbox = max(1, max_outbox)
        self.keepalive = keepalive
        self._outbox: deque[_Out] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_flushed = asyncio.Event()  # set whenever the outbox runs empty
        self._connected = asyncio.Event()
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self._closing = False
        self._starting = False  # start() is waiting for the first connection

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def outbox_depth(self) -> int:
        return len(self._outbox)

    async def wait_connected(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def start(self, first_connect_timeout: float) -> None:
        """Connect in the background; raises BrokerAuthError when the broker
        refuses the credentials on the first attempt (the link is then stopped)."""
        self._starting = True
        self.task = asyncio.create_task(self._run(), name="mqtt")
        try:
            await asyncio.wait_for(asyncio.shield(self._first), first_connect_timeout)
        except TimeoutError:
            logger.warning(
                "MQTT broker not reachable yet; retrying in the background",
                extra={"host": self.url.host, "port": self.url.port},
            )
        finally:
            self._starting = False

    async def close(self, flush_timeout: float) -> None:
        """Publish what is waiting, then `offline` (retained; up to
        `flush_timeout` seconds), and disconnect."""
        self._closing = True
        if self.connected:
            self.out(self.topics.status, b"offline", 1, retain=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_timeout):
                    while self._outbox and self.connected:
                        self._outbox_flushed.clear()
                        await self._outbox_flushed.wait()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if not self._first.done():
            self._first.cancel()

    def out(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> None:
        """Queue a message. QoS 0 (deltas) while disconnected is dropped (counted);
        a full outbox drops its oldest message (counted)."""
        if qos == 0 and not self.connected:
            self.stats.deltas_dropped += 1
            return
        if len(self._outbox) >= self.max_outbox:
            self._outbox.popleft()
            self.stats.outbox_dropped += 1
        self._outbox.append(_Out(topic, payload, qos, retain))
        self._outbox_ready.set()

    # -- connection -------------------------------------------------------

    def _new_client(self) -> aiomqtt.Client:
        return aiomqtt.Client(
            self.url.host,
            self.url.port,
            username=self.url.username,
            password=self.url.password,
            identifier=self.client_id,
            # Alone: a persistent session keeps requests while the agent is away. In a
            # share group: a clean one, so that a replica that leaves drops out of the
            # group at once (mosquitto goes on handing a persistent member its share of
            # the requests while it is offline; they would wait for it to come back).
            clean_session=self.share_group is not None,
            will=aiomqtt.Will(self.topics.status, b"offline", qos=1, retain=True),
            keepalive=self.keepalive,
            timeout=10,
            tls_context=self._tls,
            max_queued_incoming_messages=MAX_INCOMING,
            socket_options=NO_DELAY,
            logger=logging.getLogger("voice_agent.mqtt.client"),
        )

    async def _run(self) -> None:
        backoff = self.reconnect_min
        while not self._closing:
            try:
                # A fresh client per connection: the broker keeps the session (same
                # id, clean_session false); aiomqtt's reuse after a drop is fragile.
                async with self._new_client() as client:
                    backoff = self.reconnect_min
                    await self._online(client)
                    await self._serve(client)
            except aiomqtt.MqttError as exc:
                if _auth_refused(exc):
                    error = BrokerAuthError(
                        f"the MQTT broker at {self.url.host}:{self.url.port} refused the "
                        "credentials" + ("" if self.url.username else " (none were given)")
                    )
                    if self._starting and not self._first.done():
                        self._first.set_exception(error)
                        return
                    logger.error("MQTT broker refused the credentials; retrying")
                elif _untrusted(exc):
                    # A configuration problem, but not fatal: the process stays up
                    # (no restart loop) and retries with backoff (a renewed cert).
                    logger.error(
                        "the MQTT broker's TLS certificate is not trusted (check --mqtt-ca "
                        "and the host name in --mqtt); retrying in %.1f s",
                        backoff,
                        extra={"host": self.url.host, "port": self.url.port, "reason": str(exc)},
                    )
                else:
                    logger.warning(
                        "MQTT connection failed or lost: %s",
                        type(exc).__name__,
                        extra={"host": self.url.host, "port": self.url.port, "reason": str(exc)},
                    )
            except Exception:  # a bug must not end the transport: log, reconnect
                logger.exception("MQTT connection failed")
            finally:
                self._connected.clear()
            if self._closing:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.reconnect_max)

    async def _online(self, client: aiomqtt.Client) -> None:
        topics = [(self.topics.ask, 1), (self.topics.ask_audio, 1)]
        if self.share_group:
            # Every replica publishes PREFIX/status; one that leaves (its will, or a
            # clean close) sets it to `offline`: the others hear it and say `online`.
            topics.append((self.topics.status, 1))
        granted = await client.subscribe(topics)
        refused = [t for (t, _), code in zip(topics, granted, strict=False) if _refused(code)]
        if refused:  # a broker ACL that refuses, e.g., $share filters: say so, go on
            logger.error(
                "the MQTT broker refused subscriptions (check its ACL)",
                extra={"topics": ",".join(refused), "client_id": self.client_id},
            )
        await client.publish(self.topics.status, b"online", qos=1, retain=True)
        await client.publish(self.topics.discovery, self._discovery(), qos=1, retain=True)
        self.stats.connections += 1
        self._connected.set()
        if not self._first.done():
            self._first.set_result(None)
        logger.info(
            "connected to the MQTT broker",
            extra={
                "host": self.url.host,
                "port": self.url.port,
                "client_id": self.client_id,
                "prefix": self.topics.prefix,
                "share_group": self.share_group or "",
                "connections": self.stats.connections,
            },
        )

    async def _serve(self, client: aiomqtt.Client) -> None:
        """Read requests and publish the outbox until either fails (the caller
        reconnects)."""
        pump = asyncio.create_task(self._pump_outbox(client), name="mqtt-outbox")
        read = asyncio.create_task(self._read(client), name="mqtt-read")
        try:
            done, _ = await asyncio.wait((pump, read), return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # re-raise MqttError so that _run reconnects
            raise aiomqtt.MqttError("the MQTT connection ended")
        finally:
            for task in (pump, read):
                task.cancel()
            await asyncio.gather(pump, read, return_exceptions=True)

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            try:
                self._on_message(message)
            except Exception:  # a bug for one message must not stop the transport
                logger.exception("failed to handle an MQTT message")

    async def _pump_outbox(self, client: aiomqtt.Client) -> None:
        """Publish queued messages in order; one that fails stays first in line."""
        while True:
            while not self._outbox:
                self._outbox_flushed.set()
                self._outbox_ready.clear()
                await self._outbox_ready.wait()
            item = self._outbox[0]
            await client.publish(item.topic, item.payload, qos=item.qos, retain=item.retain)
            if self._outbox and self._outbox[0] is item:
                self._outbox.popleft()


def dumps(obj: dict[str, Any]) -> bytes:
    """A compact UTF-8 JSON payload."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
