"""MQTT transport (aiomqtt): requests on PREFIX/DEVICE/ask, streamed replies, commands.

Topics (PROTOCOL.md, MQTT) are built only from the prefix, the requesting
device (validated `[A-Za-z0-9_-]{1,64}`) and fixed suffixes; nothing a model
or a client writes can name a topic.

    PREFIX/status               "online" retained on connect, "offline" as the will
                                and on a clean shutdown
    PREFIX/DEVICE/ask           {"id", "text"?, "audio"? (base64 file), "session"?}
    PREFIX/DEVICE/ask/audio     raw audio file bytes; the id is generated
    PREFIX/DEVICE/reply/delta   {"id", "text"} per decoded piece (QoS 0)
    PREFIX/DEVICE/reply         {"id", "text", "commands", "timing"}
    PREFIX/DEVICE/reply/audio   the spoken reply, a WAV file (16-bit mono, 22.05 kHz),
                                after PREFIX/DEVICE/reply, when the server speaks
    PREFIX/DEVICE/command       {"id", "action", "target", "value"?} per valid command
    PREFIX/DEVICE/error         {"id", "code", "message"} (id null when unknown)
    homeassistant/binary_sensor/<prefix>/status/config   HA discovery, retained

Connection: a persistent session (clean_session false, a fixed client id) so
QoS 1 requests published while the agent is away are delivered when it comes
back; reconnects with exponential backoff (0.5 s doubling to 30 s). A broker
that refuses the credentials on the first connection makes `start` raise
errors.BrokerAuthError (the CLI prints one line and exits non-zero); later
refusals are logged and retried. TCP_NODELAY is set on the connection (paho
leaves Nagle on, which held each small publish for the broker's delayed ACK).
`close()` cancels the replies in flight, publishes what is waiting and then
`offline` (retained), and disconnects.

Several gateway replicas on one broker and prefix (`--mqtt-share-group GROUP`):
requests are taken through the shared subscriptions $share/GROUP/PREFIX/+/ask
and .../ask/audio, so the broker hands each request to one replica (messages
arrive with their plain topic). Each replica still publishes the commands of
its own WebSocket sessions. The connection uses a clean session: a replica that
leaves drops out of the group at once (mosquitto would keep handing an offline
persistent member its share of the requests); requests published while no
replica is connected are not kept. The default client id gets a random suffix
per process; an explicit --mqtt-client-id must differ per replica. Every
replica publishes the retained `online`; when one leaves (its will or a clean
close sets `offline`), the others, subscribed to PREFIX/status, publish
`online` again. The broker spreads one device's requests over the replicas;
the --db store carries the conversation between them (below). Two requests of
one device sent without waiting for the first reply may be answered in
parallel by two replicas, out of order (deploy/README.md).

Conversations and the --db store (`store`): each (device, session) pair is one
conversation, kept in the store as session_id `mqtt:DEVICE[:SESSION]` with the
owner "mqtt" (so no WebSocket client can resume it). Before a turn, a
conversation that is not in memory is loaded from the store (a restart, an LRU
release); with a share group or a shared store (PostgreSQL) the store is asked
before every turn and a copy holding more turns than the one in memory
replaces it (another replica answered since). After each reply the
conversation is saved (audio clips only with --store-audio); loads and saves
run in order on one thread, off the event loop. With a share group the reply
is published once the save is done, so the device's next request finds it on
any replica; alone, the save runs behind the reply. A failed load or save is
logged and counted (`stats.store_errors`); the turn goes on from memory.

TLS (mqtts://): the broker's certificate is checked against --mqtt-ca (the
system's CAs when unset) and the host name of --mqtt; --mqtt-cert/--mqtt-key
give a client certificate. Unreadable files are a ConfigError at start. A
certificate that fails verification is logged as an error on each attempt and
retried with the usual backoff (the process stays up: no restart loop).

Bounds and what happens when full:
- requests waiting per device: `max_queued_utterances`; overall: `max_queue`;
  beyond either the request gets an error with code `busy` (its id is not
  remembered, so it may be sent again);
- answered ids: the last 256 per device, 1024 devices (LRU); a repeated id is
  ignored (counted in `stats.duplicates`);
- conversations: 1024 (device, session) pairs in memory, least recently used
  released (with a store, loaded again at the device's next request);
- outgoing messages: 4096 waiting; when full the oldest is dropped (counted);
  deltas (QoS 0) produced while disconnected are dropped, replies, commands and
  errors wait for the reconnection;
- incoming messages waiting to be read: 1024 (aiomqtt drops beyond it).

Each request runs one engine turn; requests of one device are answered in
order, devices in parallel. Logs carry device and request ids, sizes and
counts, never audio, text or the broker password.

Metrics: the transport feeds the server's metrics.Metrics (its own when none
is given): each turn's tokens and TTFT, turn latency (request received to
reply published, transport="mqtt"), and at scrape time `stats` as
voice_agent_mqtt_* counters (mqtt_requests_total,
mqtt_commands_published_total, mqtt_commands_rejected_total, ...), whether
it is connected, and the depths of the request queues and the outbox.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import contextlib
import io
import json
import logging
import re
import socket
import ssl
import time
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import numpy as np
import soundfile

from voice_agent.audio import decode
from voice_agent.commands import Command, DeviceList, parse_commands, prompt_text
from voice_agent.commands import valid_device_name as valid_device
from voice_agent.config import Config
from voice_agent.engine.base import Conversation, Engine, TurnInput
from voice_agent.errors import (
    BadAudio,
    BadMessage,
    BrokerAuthError,
    Busy,
    ConfigError,
    VoiceAgentError,
    to_wire,
)
from voice_agent.hub import CommandBus, load_devices
from voice_agent.metrics import Metric, Metrics, counter, gauge
from voice_agent.store import Store, StoredSession
from voice_agent.tts.speaker import Speech
from voice_agent.tts.split import SentenceSplitter

logger = logging.getLogger("voice_agent.mqtt")

MAX_ID_CHARS = 128
ANSWERED_PER_DEVICE = 256
MAX_DEVICES_TRACKED = 1024
MAX_CONVERSATIONS = 1024
MAX_OUTBOX = 4096
WAV_RATE = 22050  # PREFIX/DEVICE/reply/audio: the rate of Piper's voices
MAX_INCOMING = 1024
_SESSION = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# The owner of MQTT conversations in the store: never "" (no tokens) nor a token
# hash (32 hex digits), so a WebSocket client cannot resume one.
STORE_OWNER = "mqtt"
# CONNACK refusals that mean "wrong or missing credentials" (MQTT 3.1.1 and 5)
_AUTH_CODES = {4, 5, 134, 135}


# ------------------------------------------------------------------ pure helpers


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


@dataclass(frozen=True)
class Request:
    id: str
    device: str
    text: str | None = None
    audio: bytes | None = field(default=None, repr=False)
    session: str | None = None
    received: float = 0.0


class RequestError(Exception):
    """A request that cannot be served: the error to publish and the id, if known."""

    def __init__(self, error: VoiceAgentError, request_id: str | None) -> None:
        super().__init__(error.code)
        self.error = error
        self.request_id = request_id


def parse_request(
    device: str, kind: str, payload: bytes, *, max_text_chars: int, received: float = 0.0
) -> Request:
    """A request from its topic kind and payload; RequestError when malformed."""
    if kind == "ask/audio":
        rid = uuid.uuid4().hex
        if not payload:
            raise RequestError(BadAudio("audio is empty"), rid)
        return Request(rid, device, audio=payload, received=received)
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(BadMessage("payload is not valid JSON"), None) from None
    if not isinstance(obj, dict):
        raise RequestError(BadMessage("payload must be a JSON object"), None)
    raw_id: Any = obj.get("id")
    if not isinstance(raw_id, str) or not 1 <= len(raw_id) <= MAX_ID_CHARS:
        raise RequestError(BadMessage(f"'id' must be a string of 1 to {MAX_ID_CHARS} chars"), None)
    rid = raw_id
    text, audio_b64, session = obj.get("text"), obj.get("audio"), obj.get("session")
    if text is not None and not isinstance(text, str):
        raise RequestError(BadMessage("'text' must be a string"), rid)
    if audio_b64 is not None and not isinstance(audio_b64, str):
        raise RequestError(BadMessage("'audio' must be a base64 string"), rid)
    if session is not None and (not isinstance(session, str) or not _SESSION.fullmatch(session)):
        raise RequestError(BadMessage("'session' must match [A-Za-z0-9_.:-]{1,64}"), rid)
    if text is not None and len(text) > max_text_chars:
        raise RequestError(BadMessage(f"text is longer than {max_text_chars} characters"), rid)
    if not (text and text.strip()) and not audio_b64:
        raise RequestError(BadMessage("a request needs 'text' or 'audio'"), rid)
    audio: bytes | None = None
    if audio_b64:
        try:
            audio = base64.b64decode(audio_b64, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(BadAudio("'audio' is not valid base64"), rid) from None
        if not audio:
            raise RequestError(BadAudio("audio is empty"), rid)
    clean_text = text if text and text.strip() else None
    return Request(rid, device, clean_text, audio, session, received)


class AnsweredIds:
    """Request ids already taken, per device: bounded LRU on both levels."""

    def __init__(
        self, per_device: int = ANSWERED_PER_DEVICE, devices: int = MAX_DEVICES_TRACKED
    ) -> None:
        self.per_device = per_device
        self.max_devices = devices
        self._ids: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        device, rid = key
        ids = self._ids.get(device)
        return ids is not None and rid in ids

    def add(self, device: str, rid: str) -> None:
        ids = self._ids.get(device)
        if ids is None:
            ids = self._ids[device] = OrderedDict()
            while len(self._ids) > self.max_devices:
                self._ids.popitem(last=False)
        self._ids.move_to_end(device)
        ids[rid] = None
        ids.move_to_end(rid)
        while len(ids) > self.per_device:
            ids.popitem(last=False)

    def discard(self, device: str, rid: str) -> None:
        ids = self._ids.get(device)
        if ids is not None:
            ids.pop(rid, None)


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _no_delay(client: aiomqtt.Client) -> None:
    """TCP_NODELAY on the broker connection. paho leaves Nagle on, so each small
    publish behind an unacknowledged one waited for the broker's delayed ACK
    (about 40 ms per reply on loopback). Best effort: aiomqtt keeps the paho
    client private."""
    paho = getattr(client, "_client", None)
    sock = paho.socket() if paho is not None else None
    if sock is not None:
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def default_client_id(node: str, share_group: str | None) -> str:
    """voice-agent-NODE; with a share group, a random suffix per process, since
    replicas started from one configuration must not share a client id (the
    broker would disconnect one whenever the other connects)."""
    base = f"voice-agent-{node}"
    if not share_group:
        return base[:64]
    return f"{base[:55]}-{uuid.uuid4().hex[:8]}"


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


def store_id(device: str, session: str | None) -> str:
    """The store's session_id of a device's conversation: `mqtt:DEVICE` or
    `mqtt:DEVICE:SESSION`. WebSocket sessions are hex uuids, so never collide."""
    return f"mqtt:{device}" + (f":{session}" if session else "")


# --------------------------------------------------------------------- transport


@dataclass
class MqttStats:
    requests: int = 0
    replies: int = 0
    errors: int = 0
    busy: int = 0
    duplicates: int = 0
    ignored: int = 0  # bad device names, topics we do not serve
    commands: int = 0
    commands_rejected: int = 0
    deltas_dropped: int = 0
    outbox_dropped: int = 0
    connections: int = 0
    status_restored: int = 0  # share group: `online` published again after a replica left
    conversations_loaded: int = 0  # from the store: after a restart, or newer than ours
    store_errors: int = 0  # loads and saves that failed


@dataclass(frozen=True)
class _Out:
    topic: str
    payload: bytes
    qos: int
    retain: bool = False


class MqttTransport:
    """The MQTT side of the server; see the module doc. Create inside the loop."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        bus: CommandBus | None = None,
        devices: DeviceList | None = None,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
        speech: Speech | None = None,
        metrics: Metrics | None = None,
        store: Store | None = None,
    ) -> None:
        if not config.mqtt:
            raise ConfigError("MQTT is not configured (--mqtt)")
        self.config = config
        self.engine = engine
        self.bus = bus
        # The --db store (None: conversations live in memory only). Loads and saves
        # run in order on one thread of their own, off the event loop.
        self.store = store
        self._saver = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mqtt-store")
            if store is not None
            else None
        )
        self._saves: set[asyncio.Future[None]] = set()
        self.speech = speech  # None: replies are text only
        # the allowlist: given, or the --devices file (None: replies carry no commands)
        self.devices = devices if devices is not None else load_devices(config.devices)
        self.url = parse_broker_url(config.mqtt)
        self._tls = tls_context(config) if self.url.tls else None
        self.share_group = config.mqtt_share_group or None
        self.topics = Topics(config.mqtt_prefix, self.share_group)
        self.client_id = config.mqtt_client_id or default_client_id(
            self.topics.node, self.share_group
        )
        base = config.system_prompt
        self.system_prompt = prompt_text(self.devices, base) if self.devices else base
        self.stats = MqttStats()
        self.reconnect_min = reconnect_min
        self.reconnect_max = reconnect_max
        self.per_device = max(1, config.max_queued_utterances)
        self.overall = max(1, config.max_queue)
        self._answered = AnsweredIds()
        self._pending: dict[str, deque[Request]] = {}
        self._waiting = 0
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._conversations: OrderedDict[tuple[str, str | None], Conversation] = OrderedDict()
        self._outbox: deque[_Out] = deque()
        self._outbox_ready = asyncio.Event()
        self._outbox_flushed = asyncio.Event()  # set whenever the outbox runs empty
        self._connected = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._starting = False  # start() is waiting for the first connection
        # The server's metrics (one registry with the WebSocket side), else our own.
        self.metrics = metrics if metrics is not None else Metrics()
        self._latency = self.metrics.turn_latency.labels("mqtt")
        self.metrics.add_collector(self._metric_families)
        self.metrics.add_queue("mqtt_requests", lambda: [len(q) for q in self._pending.values()])
        self.metrics.add_queue("mqtt_outbox", lambda: (len(self._outbox),))

    def _metric_families(self) -> list[Metric]:
        """`stats` and the connection state, read at each /metrics scrape."""
        st = self.stats
        return [
            counter("mqtt_requests", "MQTT requests accepted", st.requests),
            counter("mqtt_replies", "MQTT replies published", st.replies),
            counter("mqtt_errors", "MQTT error messages published", st.errors),
            counter("mqtt_busy", "MQTT requests refused as busy", st.busy),
            counter("mqtt_duplicates", "MQTT requests ignored as repeated ids", st.duplicates),
            counter("mqtt_ignored", "MQTT messages on topics not served", st.ignored),
            counter("mqtt_commands_published", "commands published on MQTT", st.commands),
            counter(
                "mqtt_commands_rejected",
                "invalid commands dropped from MQTT replies",
                st.commands_rejected,
            ),
            counter(
                "mqtt_deltas_dropped", "reply deltas dropped while disconnected", st.deltas_dropped
            ),
            counter(
                "mqtt_outbox_dropped", "messages dropped from a full outbox", st.outbox_dropped
            ),
            counter("mqtt_connections", "connections made to the broker", st.connections),
            counter(
                "mqtt_conversations_loaded",
                "MQTT conversations loaded from the store (restart, or carried on elsewhere)",
                st.conversations_loaded,
            ),
            counter(
                "mqtt_store_errors",
                "MQTT conversation loads and saves that failed",
                st.store_errors,
            ),
            gauge("mqtt_connected", "1 while connected to the broker", float(self.connected)),
        ]

    # -- lifecycle --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> None:
        async with asyncio.timeout(timeout):
            await self._connected.wait()

    async def start(self, first_connect_timeout: float = 10.0) -> None:
        """Connect in the background. Raises BrokerAuthError when the broker refuses
        the credentials on the first attempt; any other failure is retried."""
        if self.bus is not None:
            self.bus.attach(self.publish_command)
        self._starting = True
        self._task = asyncio.create_task(self._run(), name="mqtt")
        try:
            await asyncio.wait_for(asyncio.shield(self._first), first_connect_timeout)
        except TimeoutError:
            logger.warning(
                "MQTT broker not reachable yet; retrying in the background",
                extra={"host": self.url.host, "port": self.url.port},
            )
        except BrokerAuthError:
            await self.close()
            raise
        finally:
            self._starting = False

    async def close(self, flush_timeout: float = 3.0) -> None:
        """Stop the workers (replies in flight are cancelled), publish what is
        waiting and then `offline` (retained; up to `flush_timeout` seconds),
        disconnect; idempotent."""
        if self._closing:
            return
        self._closing = True
        if self.bus is not None:
            self.bus.attach(None)
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()
        await self.wait_saved()  # before the caller closes the store
        if self._saver is not None:
            self._saver.shutdown(wait=False)
        if self.connected:
            self._out(self.topics.status, b"offline", 1, retain=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(flush_timeout):
                    while self._outbox and self.connected:
                        self._outbox_flushed.clear()
                        await self._outbox_flushed.wait()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if not self._first.done():
            self._first.cancel()
        logger.info(
            "MQTT transport stopped",
            extra={k: v for k, v in vars(self.stats).items() if isinstance(v, int)},
        )

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
            keepalive=15,
            timeout=10,
            tls_context=self._tls,
            max_queued_incoming_messages=MAX_INCOMING,
            logger=logging.getLogger("voice_agent.mqtt.client"),
        )

    async def _run(self) -> None:
        backoff = self.reconnect_min
        while not self._closing:
            try:
                # A fresh client per connection: the broker keeps the session (same
                # id, clean_session false); aiomqtt's reuse after a drop is fragile.
                async with self._new_client() as client:
                    self._client = client
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
                self._client = None
            if self._closing:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.reconnect_max)

    async def _online(self, client: aiomqtt.Client) -> None:
        _no_delay(client)
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

    def _discovery(self) -> bytes:
        node = self.topics.node
        return _dumps(
            {
                "name": "Voice agent",
                "unique_id": f"{node}_status",
                "object_id": f"{node}_status",
                "state_topic": self.topics.status,
                "payload_on": "online",
                "payload_off": "offline",
                "device_class": "connectivity",
                "device": {
                    "identifiers": [node],
                    "name": f"Voice agent ({self.topics.prefix})",
                    "model": self.engine.model_name or "voice_agent",
                    "manufacturer": "voice_agent",
                },
            }
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

    def _out(self, topic: str, payload: bytes, qos: int, *, retain: bool = False) -> None:
        if qos == 0 and not self.connected:
            self.stats.deltas_dropped += 1
            return
        if len(self._outbox) >= MAX_OUTBOX:
            self._outbox.popleft()
            self.stats.outbox_dropped += 1
        self._outbox.append(_Out(topic, payload, qos, retain))
        self._outbox_ready.set()

    # -- requests ---------------------------------------------------------

    def _on_message(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)  # the plain topic, also through a $share subscription
        if topic == self.topics.status:
            self._on_status(message.payload)
            return
        parsed = self.topics.parse(topic)
        if parsed is None or not valid_device(parsed[0]):
            self.stats.ignored += 1
            logger.debug("ignored a message on an unexpected topic")
            return
        device, kind = parsed
        raw = message.payload
        payload = raw if isinstance(raw, bytes) else str(raw or "").encode("utf-8")
        if isinstance(raw, bytearray):
            payload = bytes(raw)
        limit = self.config.mqtt_max_payload
        if len(payload) > limit:
            self._error(device, None, BadMessage(f"payload is larger than {limit} bytes"))
            return
        try:
            req = parse_request(
                device,
                kind,
                payload,
                max_text_chars=self.config.max_text_chars,
                received=time.perf_counter(),
            )
        except RequestError as exc:
            self._error(device, exc.request_id, exc.error)
            return
        if (device, req.id) in self._answered:
            self.stats.duplicates += 1
            logger.info("duplicate request ignored", extra={"device": device, "request_id": req.id})
            return
        queue = self._pending.setdefault(device, deque())
        if len(queue) >= self.per_device or self._waiting >= self.overall:
            self.stats.busy += 1
            self._error(device, req.id, Busy("too many requests waiting, try again"))
            if not queue:
                del self._pending[device]
            return
        self._answered.add(device, req.id)
        queue.append(req)
        self._waiting += 1
        self.stats.requests += 1
        logger.info(
            "request queued",
            extra={
                "device": device,
                "request_id": req.id,
                "kind": kind,
                "bytes": len(payload),
                "waiting": self._waiting,
            },
        )
        if device not in self._workers:
            self._workers[device] = asyncio.create_task(self._drain(device), name=f"mqtt-{device}")

    def _on_status(self, payload: Any) -> None:
        """Share group: another replica left (its will or its clean close said
        `offline`): this one is still serving, so the status is `online` again."""
        if self.share_group is None or self._closing or not self.connected:
            return
        if payload not in (b"offline", "offline"):
            return
        self.stats.status_restored += 1
        logger.info("another replica went offline: status set online again")
        self._out(self.topics.status, b"online", 1, retain=True)

    async def _drain(self, device: str) -> None:
        """Answer one device's requests in order; ends when its queue is empty."""
        try:
            while True:
                queue = self._pending.get(device)
                if not queue:
                    self._pending.pop(device, None)
                    return
                req = queue.popleft()
                self._waiting -= 1
                try:
                    await self._answer(req)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception(
                        "request failed", extra={"device": device, "request_id": req.id}
                    )
                    self._error(device, req.id, RuntimeError("internal"))
        finally:
            self._workers.pop(device, None)

    async def _conversation(self, device: str, session: str | None) -> Conversation:
        """The conversation of (device, session): the one in memory, unless the
        store holds more turns of it (this process restarted, or another gateway
        of the share group answered since), else a new one."""
        key = (device, session)
        conv = self._conversations.get(key)
        if self.store is not None and (conv is None or self.share_group or self.store.shared):
            loaded = await self._load_newer(device, store_id(device, session), conv)
            if loaded is not None:
                if conv is not None:
                    self.engine.release(conv)
                conv = self._conversations[key] = loaded
        if conv is None:
            cid = store_id(device, session)
            conv = self.engine.new_conversation(self.system_prompt, conversation_id=cid)
            self._conversations[key] = conv
        self._conversations.move_to_end(key)
        while len(self._conversations) > MAX_CONVERSATIONS:
            _, old = self._conversations.popitem(last=False)
            self.engine.release(old)
        return conv

    async def _load_newer(
        self, device: str, sid: str, conv: Conversation | None
    ) -> Conversation | None:
        """The stored conversation `sid` rebuilt, when the store holds more turns
        than `conv` (None: not in memory); else None. Failures are logged and the
        turn goes on with what is in memory."""
        store, saver = self.store, self._saver
        assert store is not None and saver is not None
        have = conv.turns if conv is not None else 0
        loop = asyncio.get_running_loop()
        try:
            # On the store's thread, so after this gateway's own saves.
            if conv is not None:
                turns = await loop.run_in_executor(saver, store.turns_of, sid)
                if turns is None or turns <= have:
                    return None
            record = await loop.run_in_executor(saver, store.load, sid)
        except Exception:
            self.stats.store_errors += 1
            logger.exception("loading a conversation failed", extra={"device": device})
            return None
        if record is None or record.history.turns <= have:
            return None
        try:
            restored = self.engine.restore(sid, record.system_prompt, record.history)
        except Exception:
            self.stats.store_errors += 1
            logger.exception("restoring a conversation failed", extra={"device": device})
            return None
        self.stats.conversations_loaded += 1
        logger.info(
            "conversation loaded from the store",
            extra={"device": device, "session_id": sid, "turns": restored.turns, "had": have},
        )
        return restored

    def _save(self, device: str, conv: Conversation) -> asyncio.Future[None] | None:
        """Queue a save of the conversation (in order, off the loop); None when
        there is no store or the engine has no settled history to give now."""
        store, saver = self.store, self._saver
        if store is None or saver is None:
            return None
        try:
            history = self.engine.snapshot(conv)
        except Exception:
            logger.exception("snapshot failed", extra={"device": device})
            return None
        if history is None:
            return None
        record = StoredSession(
            session_id=conv.conversation_id,
            owner=STORE_OWNER,
            device=device,
            system_prompt=conv.system_prompt,
            history=history,
        )
        future = asyncio.wrap_future(saver.submit(self._save_now, store, record))
        self._saves.add(future)
        future.add_done_callback(self._saves.discard)
        return future

    def _save_now(self, store: Store, record: StoredSession) -> None:
        try:
            store.save(record)
        except Exception:
            self.stats.store_errors += 1
            logger.exception("saving a conversation failed", extra={"device": record.device})

    async def wait_saved(self) -> None:
        """Wait until every queued save is done."""
        while self._saves:
            await asyncio.gather(*list(self._saves), return_exceptions=True)
            self._saves = {f for f in self._saves if not f.done()}

    async def _answer(self, req: Request) -> None:
        device, rid = req.device, req.id
        try:
            audio = None
            if req.audio is not None:
                max_s = self.config.max_utterance_ms / 1000.0
                audio = await asyncio.to_thread(decode, req.audio, max_s)
            turn = TurnInput(audio=audio, text=req.text)
            conv = await self._conversation(device, req.session)
            handle = self.engine.submit(conv, turn, self.config.max_new_tokens)
        except VoiceAgentError as exc:
            self._error(device, rid, exc)
            return
        delta_topic = self.topics.for_device(device, "reply/delta")
        # Spoken: each sentence is synthesized as soon as it is complete (in order,
        # on the speech thread) while decoding goes on; the WAV follows the reply.
        splitter = SentenceSplitter()
        spoken: list[asyncio.Future[np.ndarray]] = []
        try:
            async for delta in handle:
                if delta.text:
                    self._out(delta_topic, _dumps({"id": rid, "text": delta.text}), 0)
                    if self.speech is not None:
                        spoken += [self._say(s) for s in splitter.feed(delta.text)]
            result = handle.result
            self.metrics.turn_result(result)
            if self.speech is not None and not result.cancelled:
                spoken += [self._say(s) for s in splitter.flush()]
        except asyncio.CancelledError:
            handle.cancel()
            for future in spoken:
                future.cancel()
            raise
        except VoiceAgentError as exc:
            for future in spoken:
                future.cancel()
            self._error(device, rid, exc)
            return
        commands: tuple[Command, ...] = ()
        if self.devices is not None and not result.cancelled:
            parsed = parse_commands(result.text, self.devices)
            commands = parsed.commands
            if parsed.rejected:
                self.stats.commands_rejected += len(parsed.rejected)
                logger.warning(
                    "invalid commands dropped",
                    extra={
                        "device": device,
                        "request_id": rid,
                        "dropped": len(parsed.rejected),
                        "reasons": ",".join(sorted({r.reason for r in parsed.rejected})),
                    },
                )
        for command in commands:
            self._publish_command(device, rid, command)
            if self.bus is not None:
                await self.bus.deliver(device, command)
        saved = self._save(device, conv)
        if saved is not None and self.share_group:
            # The device's next request may go to another gateway: that one must
            # find this turn in the store, so the reply waits for the save.
            await asyncio.shield(saved)
        timing = {
            "queue_ms": round(result.timing.queue_ms, 1),
            "ttft_ms": round(result.timing.ttft_ms, 1),
            "total_ms": round(result.timing.total_ms, 1),
            "request_ms": round((time.perf_counter() - req.received) * 1000.0, 1),
        }
        reply = {
            "id": rid,
            "text": result.text,
            "commands": [c.to_json() for c in commands],
            "timing": timing,
        }
        self._out(self.topics.for_device(device, "reply"), _dumps(reply), 1)
        self.stats.replies += 1
        self._latency.observe(timing["request_ms"] / 1000.0)
        if spoken:
            await self._publish_audio(device, rid, spoken)
        logger.info(
            "reply sent",
            extra={
                "device": device,
                "request_id": rid,
                "completion_tokens": result.usage.completion_tokens,
                "commands": len(commands),
                "total_ms": timing["request_ms"],
            },
        )

    def _say(self, sentence: str) -> asyncio.Future[np.ndarray]:
        assert self.speech is not None
        return asyncio.ensure_future(self.speech.synthesize(sentence, WAV_RATE))

    async def _publish_audio(
        self, device: str, rid: str, spoken: list[asyncio.Future[np.ndarray]]
    ) -> None:
        """The whole spoken reply as one WAV on PREFIX/DEVICE/reply/audio."""
        try:
            parts = await asyncio.gather(*spoken)
        except asyncio.CancelledError:
            for future in spoken:
                future.cancel()
            raise
        except Exception as exc:
            logger.warning(
                "speech failed: %s",
                type(exc).__name__,
                extra={"device": device, "request_id": rid},
            )
            return
        buffer = io.BytesIO()
        soundfile.write(buffer, np.concatenate(parts), WAV_RATE, format="WAV", subtype="PCM_16")
        self._out(self.topics.for_device(device, "reply/audio"), buffer.getvalue(), 1)

    def _publish_command(self, device: str, rid: str, command: Command) -> None:
        self.stats.commands += 1
        payload = {"id": rid, **command.to_json()}
        self._out(self.topics.for_device(device, "command"), _dumps(payload), 1)

    async def publish_command(self, device: str, command: Command) -> None:
        """CommandBus sink: a command from a WebSocket session of `device`."""
        if not valid_device(device):
            return
        self._publish_command(device, f"ws-{uuid.uuid4().hex[:12]}", command)

    def _error(self, device: str, rid: str | None, exc: BaseException) -> None:
        wire = to_wire(exc)
        self.stats.errors += 1
        logger.info(
            "request refused",
            extra={"device": device, "request_id": rid or "", "code": wire.code},
        )
        payload = _dumps({"id": rid, "code": wire.code, "message": wire.message})
        self._out(self.topics.for_device(device, "error"), payload, 1)


# ------------------------------------------------------------------ entry point


@contextlib.asynccontextmanager
async def running_mqtt(
    config: Config,
    engine: Engine,
    *,
    bus: CommandBus | None = None,
    devices: DeviceList | None = None,
    **kwargs: Any,
) -> Any:
    """Start an MqttTransport for the block (the engine must be started)."""
    transport = MqttTransport(config, engine, bus=bus, devices=devices, **kwargs)
    await transport.start()
    try:
        yield transport
    finally:
        await transport.close()
