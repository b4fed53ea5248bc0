"""The glue: MQTT messages in, host calls out; session events in, MQTT out
(MqttTransport, running_mqtt). The wire is described in the package doc
(__init__.py); one request's turn in answer.py."""

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
from voice_agent.commands import Command
from voice_agent.commands import valid_device_name as valid_device
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.errors import BadMessage, BrokerAuthError, Busy, ConfigError, VoiceAgentError
from voice_agent.host import ConversationHost
from voice_agent.metrics import Metric, counter, gauge

from .answer import Answer
from .link import BrokerLink, dumps, tls_context
from .request import AnsweredIds, Request, RequestError, parse_request
from .stats import MqttStats
from .topics import STORE_OWNER, Topics, default_client_id, parse_broker_url, store_id

logger = logging.getLogger("voice_agent.mqtt")

TRANSPORT = "mqtt"  # the label of this transport's metrics and error reports


class MqttTransport:
    """The MQTT side of the server, on the process's ConversationHost; see
    the package doc. Create inside the running loop."""

    def __init__(
        self,
        config: Config,
        host: ConversationHost,
        *,
        reconnect_min: float = 0.5,
        reconnect_max: float = 30.0,
    ) -> None:
        if not config.mqtt:
            raise ConfigError("MQTT is not configured (--mqtt)")
        self.config = config
        self.host = host
        self.url = parse_broker_url(config.mqtt)
        self.share_group = config.mqtt_share_group or None
        self.topics = Topics(config.mqtt_prefix, self.share_group)
        self.client_id = config.mqtt_client_id or default_client_id(
            self.topics.node, self.share_group
        )
        self.stats = MqttStats()
        self.per_device = max(1, config.max_queued_utterances)
        self.overall = max(1, config.max_queue)
        self._answered = AnsweredIds()
        self._pending: dict[str, deque[Request]] = {}
        self._waiting = 0
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._closing = False
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
        )
        self._out = self.link.out
        # The host's metrics: one registry, one /metrics for every transport.
        self.metrics = host.metrics
        self._latency = self.metrics.turn_latency.labels(TRANSPORT)
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
            gauge("mqtt_connected", "1 while connected to the broker", float(self.connected)),
        ]

    # -- lifecycle --------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self.link.connected

    async def wait_connected(self, timeout: float | None = None) -> None:
        await self.link.wait_connected(timeout)

    async def start(self, first_connect_timeout: float = 10.0) -> None:
        """Connect in the background. Raises BrokerAuthError when the broker refuses
        the credentials on the first attempt; any other failure is retried."""
        if self.host.bus is not None:
            self.host.bus.attach(self.publish_command)
        try:
            await self.link.start(first_connect_timeout)
        except BrokerAuthError:
            await self.close()
            raise

    async def close(self, flush_timeout: float = 3.0) -> None:
        """Stop the workers (replies in flight are cancelled, their sessions
        ended and saved), publish what is waiting and then `offline`
        (retained; up to `flush_timeout` seconds), disconnect; idempotent.
        The host is not closed (its owner does that, after this)."""
        if self._closing:
            return
        self._closing = True
        if self.host.bus is not None:
            self.host.bus.attach(None)
        workers = list(self._workers.values())
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        self._workers.clear()
        await self.link.close(flush_timeout)
        logger.info(
            "MQTT transport stopped",
            extra={k: v for k, v in vars(self.stats).items() if isinstance(v, int)},
        )

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
                    "model": self.host.engine.model_name or "voice_agent",
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
                    await self._admit(req)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # a bug: reported (logged with its traceback)
                    self._error(device, req.id, exc)
        finally:
            self._workers.pop(device, None)

    async def _admit(self, req: Request) -> None:
        """The host's admission check, then the turn. A refused request
        (loading, server_full, shutting_down) gets an error with that code
        and its id is forgotten: sent again later, it is answered."""
        try:
            ticket = self.host.admission.admit()
        except VoiceAgentError as exc:
            self._answered.discard(req.device, req.id)
            self._error(req.device, req.id, exc)
            return
        with ticket:
            await self._answer(req)

    async def _answer(self, req: Request) -> None:
        device, rid = req.device, req.id
        answer = Answer(rid, self.topics.for_device(device, "reply/delta"), self._out)
        try:
            turn = await self._turn_input(req)
            live, resumed = await self.host.start_request(
                store_id(device, req.session),
                answer.send,
                owner=STORE_OWNER,
                transport=TRANSPORT,
                device=device,
                # a share group: another replica may have answered this device since
                check_store=True if self.share_group else None,
            )
        except VoiceAgentError as exc:
            self._error(device, rid, exc)
            return
        if resumed in ("store", "reloaded"):
            self.stats.conversations_loaded += 1
        answer.speak(self.host.speech)
        try:
            try:
                await live.turn(turn)
                await answer.wait(live)
            finally:
                saved = await self.host.end_request(live)
        except BaseException as exc:
            answer.cancel_speech()
            if not isinstance(exc, VoiceAgentError):
                raise
            self._error(device, rid, exc)
            return
        if answer.error is not None:  # counted by the session's metrics
            self._publish_error(device, rid, answer.error.code, answer.error.message)
            return
        await self._reply(req, answer, saved)

    async def _turn_input(self, req: Request) -> TurnInput:
        """The request as one turn: the audio file decoded (off the loop;
        BadAudio when it is not audio) and/or the text."""
        audio = None
        if req.audio is not None:
            max_s = self.config.max_utterance_ms / 1000.0
            audio = await asyncio.to_thread(decode, req.audio, max_s)
        return TurnInput(audio=audio, text=req.text)

    async def _reply(
        self, req: Request, answer: Answer, saved: asyncio.Future[bool] | None
    ) -> None:
        """Commands, then the reply, then its WAV (see the package doc)."""
        device, rid = req.device, req.id
        bus = self.host.bus
        for command in answer.commands:
            self._publish_command(device, rid, command)
            if bus is not None:
                await bus.deliver(device, command)  # the device's WebSocket sessions
        if saved is not None and self.share_group:
            # The device's next request may go to another gateway: that one must
            # find this turn in the store, so the reply waits for the save.
            await asyncio.shield(saved)
        done = answer.done
        timing: dict[str, float] = dict(done.timing) if done is not None else {}
        timing["request_ms"] = round((time.perf_counter() - req.received) * 1000.0, 1)
        reply = {
            "id": rid,
            "text": answer.text,
            "commands": [c.to_json() for c in answer.commands],
            "timing": timing,
        }
        self._out(self.topics.for_device(device, "reply"), dumps(reply), 1)
        self.stats.replies += 1
        self._latency.observe(timing["request_ms"] / 1000.0)
        wav = await answer.wav_bytes()
        if wav is not None:
            self._out(self.topics.for_device(device, "reply/audio"), wav, 1)
        usage = done.usage if done is not None else {}
        logger.info(
            "reply sent",
            extra={
                "device": device,
                "request_id": rid,
                "completion_tokens": usage.get("completion_tokens", 0),
                "commands": len(answer.commands),
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
        """Report `exc` to the host (counted by code, logged, mapped to the
        wire by errors.py) and publish what the device may see of it."""
        wire = self.host.report(exc, transport=TRANSPORT, device=device, request_id=rid or "")
        self._publish_error(device, rid, wire.code, wire.message)

    def _publish_error(self, device: str, rid: str | None, code: str, message: str) -> None:
        self.stats.errors += 1
        payload = dumps({"id": rid, "code": code, "message": message})
        self._out(self.topics.for_device(device, "error"), payload, 1)


# ------------------------------------------------------------------ entry point


@contextlib.asynccontextmanager
async def running_mqtt(config: Config, host: ConversationHost, **kwargs: Any) -> Any:
    """Start an MqttTransport on `host` for the block (the engine must be
    started; the caller closes the host afterwards)."""
    transport = MqttTransport(config, host, **kwargs)
    await transport.start()
    try:
        yield transport
    finally:
        await transport.close()
