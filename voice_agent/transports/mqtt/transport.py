"""The glue: MQTT messages in, engine turns, MQTT replies out (MqttTransport,
running_mqtt). The wire is described in the package doc (__init__.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from typing import Any

import aiomqtt

from voice_agent.audio import decode
from voice_agent.commands import Command, DeviceList, parse_commands, prompt_text
from voice_agent.commands import valid_device_name as valid_device
from voice_agent.config import Config
from voice_agent.engine.base import Engine, TurnInput
from voice_agent.errors import (
    BadMessage,
    BrokerAuthError,
    Busy,
    ConfigError,
    VoiceAgentError,
    to_wire,
)
from voice_agent.hub import CommandBus, load_devices
from voice_agent.metrics import Metric, Metrics, counter, gauge
from voice_agent.store import Store
from voice_agent.tts.speaker import Speech

from .conversations import MAX_CONVERSATIONS, MqttConversations
from .link import KEEPALIVE_S, MAX_OUTBOX, BrokerLink, dumps, tls_context
from .request import AnsweredIds, Request, RequestError, parse_request
from .speech import SpokenReply
from .stats import MqttStats
from .topics import Topics, default_client_id, parse_broker_url

logger = logging.getLogger("voice_agent.mqtt")


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
        self.speech = speech  # None: replies are text only
        # the allowlist: given, or the --devices file (None: replies carry no commands)
        self.devices = devices if devices is not None else load_devices(config.devices)
        self.url = parse_broker_url(config.mqtt)
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
        self._closing = False
        self.conversations = MqttConversations(
            engine,
            store,
            self.stats,
            system_prompt=self.system_prompt,
            share_group=self.share_group,
            capacity=getattr(config, "mqtt_max_conversations", MAX_CONVERSATIONS),
        )
        self.link = BrokerLink(
            self.url,
            self.topics,
            self.client_id,
            share_group=self.share_group,
            tls=tls_context(config) if self.url.tls else None,
            discovery=self._discovery,
            on_message=self._on_message,
            stats=self.stats,
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
            max_outbox=getattr(config, "mqtt_max_outbox", MAX_OUTBOX),
            keepalive=getattr(config, "mqtt_keepalive", KEEPALIVE_S),
        )
        self._out = self.link.out
        # The server's metrics (one registry with the WebSocket side), else our own.
        self.metrics = metrics if metrics is not None else Metrics()
        self._latency = self.metrics.turn_latency.labels("mqtt")
        self.metrics.add_collector(self._metric_families)
        self.metrics.add_queue("mqtt_requests", lambda: [len(q) for q in self._pending.values()])
        self.metrics.add_queue("mqtt_outbox", lambda: (self.link.outbox_depth,))

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
        return self.link.connected

    @property
    def _task(self) -> asyncio.Task[None] | None:
        """The link's connection task (tests check it is still retrying)."""
        return self.link.task

    async def wait_connected(self, timeout: float | None = None) -> None:
        await self.link.wait_connected(timeout)

    async def start(self, first_connect_timeout: float = 10.0) -> None:
        """Connect in the background. Raises BrokerAuthError when the broker refuses
        the credentials on the first attempt; any other failure is retried."""
        if self.bus is not None:
            self.bus.attach(self.publish_command)
        try:
            await self.link.start(first_connect_timeout)
        except BrokerAuthError:
            await self.close()
            raise

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
        await self.conversations.close()  # saves done before the caller closes the store
        await self.link.close(flush_timeout)
        logger.info(
            "MQTT transport stopped",
            extra={k: v for k, v in vars(self.stats).items() if isinstance(v, int)},
        )

    async def wait_saved(self) -> None:
        """Wait until every queued save is done."""
        await self.conversations.wait_saved()

    def _discovery(self) -> bytes:
        node = self.topics.node
        return dumps(
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

    async def _answer(self, req: Request) -> None:
        device, rid = req.device, req.id
        try:
            audio = None
            if req.audio is not None:
                max_s = self.config.max_utterance_ms / 1000.0
                audio = await asyncio.to_thread(decode, req.audio, max_s)
            turn = TurnInput(audio=audio, text=req.text)
            conv = await self.conversations.get(device, req.session)
            handle = self.engine.submit(conv, turn, self.config.max_new_tokens)
        except VoiceAgentError as exc:
            self._error(device, rid, exc)
            return
        delta_topic = self.topics.for_device(device, "reply/delta")
        # Spoken: each sentence is synthesized as soon as it is complete (in order,
        # on the speech thread) while decoding goes on; the WAV follows the reply.
        spoken = SpokenReply(self.speech) if self.speech is not None else None
        try:
            async for delta in handle:
                if delta.text:
                    self._out(delta_topic, dumps({"id": rid, "text": delta.text}), 0)
                    if spoken is not None:
                        spoken.feed(delta.text)
            result = handle.result
            self.metrics.turn_result(result)
            if spoken is not None and not result.cancelled:
                spoken.finish()
        except asyncio.CancelledError:
            handle.cancel()
            if spoken is not None:
                spoken.cancel()
            raise
        except VoiceAgentError as exc:
            if spoken is not None:
                spoken.cancel()
            self._error(device, rid, exc)
            return
        commands: tuple[Command, ...] = ()
        if self.devices is not None and not result.cancelled:
            parsed = parse_commands(result.text, self.devices)
            commands = parsed.commands
            if parsed.rejected:
                self.stats.commands_rejected += len(parsed.rejected)
                # the same counter as the WebSocket sessions' rejected commands
                self.metrics.commands_rejected.inc(len(parsed.rejected))
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
        saved = self.conversations.save(device, conv)
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
        self._out(self.topics.for_device(device, "reply"), dumps(reply), 1)
        self.stats.replies += 1
        self._latency.observe(timing["request_ms"] / 1000.0)
        wav = await spoken.wav() if spoken is not None else None
        if wav is not None:
            self._out(self.topics.for_device(device, "reply/audio"), wav, 1)
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

    def _publish_command(self, device: str, rid: str, command: Command) -> None:
        self.stats.commands += 1
        payload = {"id": rid, **command.to_json()}
        self._out(self.topics.for_device(device, "command"), dumps(payload), 1)

    async def publish_command(self, device: str, command: Command) -> None:
        """CommandBus sink: a command from a WebSocket session of `device`."""
        if not valid_device(device):
            return
        self._publish_command(device, f"ws-{uuid.uuid4().hex[:12]}", command)

    def _error(self, device: str, rid: str | None, exc: BaseException) -> None:
        wire = to_wire(exc)
        self.stats.errors += 1
        self.metrics.errors.labels(wire.code).inc()  # errors_total{code}, as WebSocket's
        logger.info(
            "request refused",
            extra={"device": device, "request_id": rid or "", "code": wire.code},
        )
        payload = dumps({"id": rid, "code": wire.code, "message": wire.message})
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
