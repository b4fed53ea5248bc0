"""Prometheus metrics of one server (prometheus-client), on a registry of its own.

`Metrics` holds the counters and histograms that the transports feed as
things happen (one counter increment per event, never per audio frame), and
collects everything else only when /metrics is scraped: callback gauges the
transports register (open sessions, queue depths), the engine's figures
(`Engine.runtime_stats`), the WebSocket limit counters and the MQTT
transport's counters. Each server owns one CollectorRegistry, so several
servers in one process (tests) never collide; `render()` is the text format.

Every name starts with `voice_agent_`:

    sessions_active                 gauge    sessions open now (an MQTT request is a
                                             session of one turn while it runs)
    sessions_total                  counter  sessions started (the same)
    utterances_total                counter  utterances closed (speech.stopped)
    turns_total                     counter  replies finished or cancelled
    barge_ins_total                 counter  replies cancelled by barge-in
    continuations_total             counter  replies taken back because the user went on
                                             speaking (reply.cancelled "continued"; one
                                             after its reply.done is not a second turn)
    errors_total{code}              counter  error events and messages sent to clients
                                             (realtime and MQTT)
    transport_errors_total{transport,code}
                                    counter  every error a transport reported
                                             (host/report.py), admission refusals
                                             and other closes included
    commands_total                  counter  validated commands sent to clients (realtime
                                             sessions and MQTT requests)
    commands_rejected_total         counter  invalid commands dropped (the same)
    dropped_frames_total            counter  WebRTC audio frames dropped (session behind)
    tokens_generated_total          counter  reply tokens decoded (finished and cancelled
                                             turns, both transports): rate() is tokens/s
    ttft_seconds                    histogram turn submitted -> first reply token (engine)
    turn_latency_seconds{transport} histogram end of speech -> reply.done (realtime; a
                                             typed turn counts from reply.started);
                                             request received -> reply published (mqtt)
    queue_depth{queue}              gauge    items waiting, summed over every queue of
                                             that kind: send (events and audio frames
                                             per connection), turns (turns waiting
                                             behind a running reply, per session),
                                             engine (turns submitted, not started),
                                             mqtt_requests (per device), mqtt_outbox
    queue_depth_max{queue}          gauge    the fullest single queue of that kind
    engine_batch_size               gauge    turns decoding together now
    engine_kv_cache_bytes           gauge    KV cache bytes held by the engine
    kept_conversation_bytes         gauge    clips and ids of ended conversations kept
                                             for resuming (host/conversations.py)
    mqtt_*                          counters and gauges of the MQTT transport
                                             (transports/mqtt/), among them
                                             mqtt_requests_total and
                                             mqtt_commands_published_total
    auth_failures_total, ...        counters the WebSocket limits (transports/websocket/)

A scrape callback that fails is logged and left out of that scrape; /metrics
never fails because of one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric as Metric  # re-exported

from voice_agent.engine.base import Engine, TurnResult
from voice_agent.errors import CLOSE_ONLY_CODES, ERROR_CODES
from voice_agent.protocol import (
    CommandEvent,
    ErrorEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SpeechStoppedEvent,
)

logger = logging.getLogger("voice_agent.metrics")

# No `<name>_created` series next to every counter: twice the series for a
# figure nobody graphs. (A process-wide prometheus-client setting.)
disable_created_metrics()  # type: ignore[no-untyped-call]

PREFIX = "voice_agent_"
# The text exposition format every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
TURN_BUCKETS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 30.0, 60.0)
# Every protocol error code (errors.py), so each one is exported from the start.

# The transports errors are counted for (errors_by_transport), from the start.
TRANSPORTS = ("realtime", "mqtt", "openai", "wyoming")

Families = Callable[[], Iterable[Metric]]
Depths = Callable[[], Iterable[int]]


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    """A counter family for a scrape-time collector (`name` without the prefix)."""
    return CounterMetricFamily(PREFIX + name, documentation, value=value)


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """A gauge family for a scrape-time collector (`name` without the prefix)."""
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


class _Callback:
    """A collector that asks `families()` at each scrape."""

    def __init__(self, families: Families) -> None:
        self._families = families

    def collect(self) -> Iterator[Metric]:
        try:
            yield from list(self._families())
        except Exception:
            logger.exception("a metrics callback failed; left out of this scrape")


class Metrics:
    """The metrics of one server; see the module doc for the list.

    Counters and histograms are public attributes, fed by the transports
    (`observer()` for a realtime session's events, `turn_result` for an
    engine turn). `add_queue`, `add_collector` and `watch_engine` register
    what is read at scrape time.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.sessions_open = Gauge(
            PREFIX + "sessions_active", "realtime sessions open now", registry=r
        )
        self.sessions = Counter(PREFIX + "sessions", "realtime sessions started", registry=r)
        self.utterances = Counter(
            PREFIX + "utterances", "utterances closed by the VAD or a commit", registry=r
        )
        self.turns = Counter(PREFIX + "turns", "replies finished or cancelled", registry=r)
        self.barge_ins = Counter(PREFIX + "barge_ins", "replies cancelled by barge-in", registry=r)
        self.continuations = Counter(
            PREFIX + "continuations", "replies taken back: the user went on speaking", registry=r
        )
        self.errors = Counter(
            PREFIX + "errors", "error events and messages sent to clients", ["code"], registry=r
        )
        for code in ERROR_CODES:
            self.errors.labels(code)
        self.errors_by_transport = Counter(
            PREFIX + "transport_errors",
            "errors reported by a transport (host/report.py), closes included",
            ["transport", "code"],
            registry=r,
        )
        for transport in TRANSPORTS:
            for code in ERROR_CODES + CLOSE_ONLY_CODES:
                self.errors_by_transport.labels(transport, code)
        self.commands = Counter(
            PREFIX + "commands", "validated commands sent to realtime clients", registry=r
        )
        self.commands_rejected = Counter(
            PREFIX + "commands_rejected",
            "invalid commands dropped from replies of realtime sessions",
            registry=r,
        )
        self.dropped_frames = Counter(
            PREFIX + "dropped_frames",
            "WebRTC audio frames dropped because the session fell behind",
            registry=r,
        )
        self.tokens = Counter(
            PREFIX + "tokens_generated",
            "reply tokens decoded (finished and cancelled turns); rate() is tokens/s",
            registry=r,
        )
        self.ttft = Histogram(
            PREFIX + "ttft_seconds",
            "time from submitting a turn to its first reply token",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.turn_latency = Histogram(
            PREFIX + "turn_latency_seconds",
            "end of speech (realtime) or request received (mqtt) to the finished reply",
            ["transport"],
            buckets=TURN_BUCKETS,
            registry=r,
        )
        self._queues: dict[str, Depths] = {}
        r.register(_Callback(self._collect_queues))

    # -- fed as things happen ---------------------------------------------

    def observer(
        self,
        clock: Callable[[], float] = time.monotonic,
        *,
        transport: str = "realtime",
        turn_latency: bool = True,
    ) -> SessionMetrics:
        """What one session feeds its events to; `transport` labels its
        errors and turn latency (turn_latency=False: the transport times its
        turns itself, as MQTT does from request to reply)."""
        return SessionMetrics(self, clock, transport=transport, turn_latency=turn_latency)

    def turn_result(self, result: TurnResult) -> None:
        """An engine turn ended (finished or cancelled): its tokens and TTFT."""
        tokens = result.usage.completion_tokens
        if tokens > 0:
            self.tokens.inc(tokens)
            self.ttft.observe(max(0.0, result.timing.ttft_ms / 1000.0))

    # -- read at scrape time ------------------------------------------------

    def add_collector(self, families: Families) -> None:
        """Call `families()` at each scrape; it returns metric families (use
        `counter` and `gauge`) whose names no other collector uses."""
        self.registry.register(_Callback(families))

    def add_queue(self, name: str, depths: Depths) -> None:
        """A kind of queue: `depths()` gives the length of each queue of that
        kind at scrape time (exported as their sum and their maximum)."""
        self._queues[name] = depths

    def watch_engine(self, engine: Engine) -> None:
        """Export the engine's runtime_stats (batch size, KV bytes, queue)."""
        self.add_queue("engine", lambda: (engine.runtime_stats().queued,))

        def families() -> Iterator[Metric]:
            stats = engine.runtime_stats()
            yield gauge("engine_batch_size", "turns decoding together now", stats.batch_size)
            yield gauge(
                "engine_kv_cache_bytes", "KV cache bytes held by the engine", stats.kv_cache_bytes
            )

        self.add_collector(families)

    def _collect_queues(self) -> Iterator[Metric]:
        total = GaugeMetricFamily(
            PREFIX + "queue_depth",
            "items waiting, summed over the queues of a kind",
            labels=["queue"],
        )
        largest = GaugeMetricFamily(
            PREFIX + "queue_depth_max",
            "items waiting in the fullest queue of a kind",
            labels=["queue"],
        )
        for name, depths in list(self._queues.items()):
            try:
                values = list(depths())
            except Exception:
                logger.exception("queue depth callback %s failed", name)
                continue
            total.add_metric([name], float(sum(values)))
            largest.add_metric([name], float(max(values, default=0)))
        yield total
        yield largest

    def render(self) -> bytes:
        """Every metric in the Prometheus text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)

    # -- reading back (tests, benchmarks) -----------------------------------

    def total(self, name: str) -> float:
        """The sum of every sample called `name` (labels ignored); 0 if none."""
        return sum(
            sample.value
            for family in self.registry.collect()
            for sample in family.samples
            if sample.name == name
        )

    @property
    def sessions_active(self) -> int:
        return int(self.total(PREFIX + "sessions_active"))

    @property
    def sessions_total(self) -> int:
        return int(self.total(PREFIX + "sessions_total"))

    @property
    def utterances_total(self) -> int:
        return int(self.total(PREFIX + "utterances_total"))

    @property
    def turns_total(self) -> int:
        return int(self.total(PREFIX + "turns_total"))

    @property
    def barge_ins_total(self) -> int:
        return int(self.total(PREFIX + "barge_ins_total"))

    @property
    def errors_total(self) -> int:
        return int(self.total(PREFIX + "errors_total"))

    def errors_of(self, transport: str, code: str) -> int:
        """How many errors of `code` the transport reported (transport_errors_total)."""
        labels = {"transport": transport, "code": code}
        value = self.registry.get_sample_value(PREFIX + "transport_errors_total", labels)
        return int(value or 0)

    @property
    def commands_total(self) -> int:
        return int(self.total(PREFIX + "commands_total"))

    @property
    def commands_rejected_total(self) -> int:
        return int(self.total(PREFIX + "commands_rejected_total"))


class SessionMetrics:
    """One session's events into the server's Metrics (a realtime session,
    or an MQTT request's one-turn session: `transport`).

    Keeps the clocks turn latency needs: when each utterance's speech ended
    (speech.stopped) and when each reply's turn began (that moment for a
    voice turn, reply.started for a typed one), until reply.done. Both maps
    are bounded (utterances that never get a reply, such as dropped ones,
    age out).
    """

    MAX_PENDING = 32

    def __init__(
        self,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        *,
        transport: str = "realtime",
        turn_latency: bool = True,
    ) -> None:
        self.metrics = metrics
        self.transport = transport
        self._clock = clock
        self._latency = metrics.turn_latency.labels(transport) if turn_latency else None
        self._speech_end: dict[str, float] = {}
        self._turn_start: dict[str, float] = {}

    def _remember(self, table: dict[str, float], key: str, when: float) -> None:
        table[key] = when
        if len(table) > self.MAX_PENDING:
            del table[next(iter(table))]  # the oldest

    def observe(self, event: ServerEvent) -> None:
        """Count one event sent to the client (deltas, the most frequent, cost
        one isinstance check)."""
        if isinstance(event, ReplyDelta):
            return
        m = self.metrics
        if isinstance(event, SpeechStoppedEvent):
            m.utterances.inc()
            self._remember(self._speech_end, event.utterance_id, self._clock())
        elif isinstance(event, ReplyStarted):
            start = None
            if event.utterance_id is not None:
                start = self._speech_end.pop(event.utterance_id, None)
            when = start if start is not None else self._clock()
            self._remember(self._turn_start, event.reply_id, when)
        elif isinstance(event, ReplyDone):
            m.turns.inc()
            start = self._turn_start.pop(event.reply_id, None)
            if start is not None and self._latency is not None:
                self._latency.observe(max(0.0, self._clock() - start))
        elif isinstance(event, ReplyCancelled):
            if event.reason != "continued" or event.reply_id in self._turn_start:
                m.turns.inc()  # (a reply taken back after its reply.done counted then)
            if event.reason == "barge_in":
                m.barge_ins.inc()
            elif event.reason == "continued":
                m.continuations.inc()
            self._turn_start.pop(event.reply_id, None)
        elif isinstance(event, ErrorEvent):
            m.errors.labels(event.code).inc()
            m.errors_by_transport.labels(self.transport, event.code).inc()
            if event.reply_id is not None:
                self._turn_start.pop(event.reply_id, None)
        elif isinstance(event, CommandEvent):
            m.commands.inc()

    def rejected_commands(self, n: int) -> None:
        self.metrics.commands_rejected.inc(n)
