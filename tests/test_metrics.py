"""metrics.py: the per-server registry, session events, turn results, scrape-time callbacks."""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.clocks import FakeClock
from voice_agent.engine.base import EngineStats, Timing, TurnInput, TurnResult, Usage
from voice_agent.engine.deferred import DeferredEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import EngineError, ModelLoadError
from voice_agent.metrics import Metrics, counter, gauge
from voice_agent.protocol import (
    CommandEvent,
    ErrorEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    SpeechStoppedEvent,
)

pytestmark = pytest.mark.timeout(60)


def parse(metrics: Metrics) -> dict[str, float]:
    """The rendered text, parsed back: {name{labels}: value}."""
    out = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def done(reply_id: str) -> ReplyDone:
    return ReplyDone(reply_id, "text", {"completion_tokens": 1}, {"ttft_ms": 1.0})


def test_session_events_count_and_time_turns_from_the_end_of_speech() -> None:
    metrics, clock = Metrics(), FakeClock()
    obs = metrics.observer(clock)
    obs.observe(SpeechStoppedEvent("u1", 0, 1500))  # speech ends at t=100
    clock.now = 100.5
    obs.observe(ReplyStarted("r1", "u1"))
    obs.observe(ReplyDelta("r1", "Hi"))
    clock.now = 102.0
    obs.observe(done("r1"))  # 2.0 s after the end of speech, not 1.5 after reply.started
    obs.observe(ReplyStarted("r2", None))  # a typed turn counts from reply.started
    clock.now = 103.0
    obs.observe(done("r2"))
    obs.observe(ReplyStarted("r3", None))
    obs.observe(ReplyCancelled("r3", "barge_in", ""))
    obs.observe(ReplyStarted("r4", None))
    obs.observe(ReplyCancelled("r4", "client", ""))
    obs.observe(ErrorEvent("busy", "too many turns waiting"))
    obs.observe(ReplyStarted("r5", None))
    obs.observe(done("r5"))
    obs.observe(ReplyCancelled("r5", "continued", "text"))  # taken back after its done
    obs.observe(CommandEvent("off", "light.kitchen"))
    obs.rejected_commands(2)

    m = parse(metrics)
    assert m["voice_agent_utterances_total"] == 1
    assert m["voice_agent_turns_total"] == 5  # done and cancelled, each once
    assert m["voice_agent_barge_ins_total"] == 1
    assert m["voice_agent_continuations_total"] == 1
    assert m['voice_agent_errors_total{code="busy"}'] == 1
    assert m['voice_agent_errors_total{code="internal"}'] == 0  # every code, from the start
    assert m["voice_agent_commands_total"] == 1
    assert m["voice_agent_commands_rejected_total"] == 2
    latency = 'voice_agent_turn_latency_seconds_{}{{transport="realtime"}}'
    assert m[latency.format("count")] == 3  # cancelled replies have no latency
    assert m[latency.format("sum")] == pytest.approx(3.0)
    # the old attribute names read the same counters
    assert (metrics.turns_total, metrics.barge_ins_total, metrics.errors_total) == (5, 1, 1)
    assert (metrics.commands_total, metrics.commands_rejected_total) == (1, 2)


def test_pending_clocks_are_bounded() -> None:
    """Replies that never end and utterances that never get a reply age out:
    only the newest MAX_PENDING of each are remembered (seen in turn latency)."""
    metrics, clock = Metrics(), FakeClock()
    obs = metrics.observer(clock)
    n = 500
    oldest_kept = n - obs.MAX_PENDING
    for i in range(n):
        obs.observe(SpeechStoppedEvent(f"u{i}", 0, 10))  # speech ends at t=100
        obs.observe(ReplyStarted(f"r{i}", None))  # replies that never end
    latency = 'voice_agent_turn_latency_seconds_{}{{transport="realtime"}}'
    obs.observe(done(f"r{oldest_kept - 1}"))  # forgotten: no latency
    assert parse(metrics)[latency.format("count")] == 0
    obs.observe(done(f"r{oldest_kept}"))  # remembered: 0 s
    assert parse(metrics)[latency.format("count")] == 1
    clock.advance(5.0)
    obs.observe(ReplyStarted("late", f"u{oldest_kept - 1}"))  # forgotten: counts from now
    obs.observe(ReplyStarted("kept", f"u{oldest_kept}"))  # from the end of its speech
    clock.advance(1.0)
    obs.observe(done("late"))
    obs.observe(done("kept"))
    m = parse(metrics)
    assert m[latency.format("count")] == 3
    assert m[latency.format("sum")] == pytest.approx(0.0 + 1.0 + 6.0)


def test_turn_results_feed_tokens_and_ttft() -> None:
    metrics = Metrics()
    metrics.turn_result(TurnResult("a b c", Usage(completion_tokens=7), Timing(ttft_ms=250.0)))
    metrics.turn_result(  # cancelled after 3 tokens: they were decoded, they count
        TurnResult("a", Usage(completion_tokens=3), Timing(ttft_ms=40.0), cancelled=True)
    )
    metrics.turn_result(TurnResult("", Usage(), Timing(ttft_ms=900.0), cancelled=True))
    m = parse(metrics)
    assert m["voice_agent_tokens_generated_total"] == 10
    assert m["voice_agent_ttft_seconds_count"] == 2  # no token, no first token time
    assert m["voice_agent_ttft_seconds_sum"] == pytest.approx(0.29)
    assert m['voice_agent_ttft_seconds_bucket{le="0.05"}'] == 1
    assert m['voice_agent_ttft_seconds_bucket{le="0.2"}'] == 1
    assert m['voice_agent_ttft_seconds_bucket{le="0.3"}'] == 2


def test_each_server_has_its_own_registry() -> None:
    a, b = Metrics(), Metrics()
    a.sessions.inc()
    a.sessions_open.set_function(lambda: 3)
    assert parse(a)["voice_agent_sessions_total"] == 1
    assert parse(b)["voice_agent_sessions_total"] == 0
    assert (a.sessions_active, b.sessions_active) == (3, 0)
    names = [f.name for f in text_string_to_metric_families(a.render().decode())]
    assert len(names) == len(set(names))  # no family twice
    assert all(n.startswith("voice_agent_") for n in names)
    assert not any(n.endswith("_created") for n in parse(a))


def test_queue_depths_are_summed_and_maxed_at_scrape_time() -> None:
    metrics = Metrics()
    depths = [1, 4, 2]
    metrics.add_queue("send", lambda: depths)
    metrics.add_queue("empty", list)

    def broken() -> list[int]:
        raise RuntimeError("a bug in a callback")

    metrics.add_queue("broken", broken)
    m = parse(metrics)
    assert m['voice_agent_queue_depth{queue="send"}'] == 7
    assert m['voice_agent_queue_depth_max{queue="send"}'] == 4
    assert m['voice_agent_queue_depth{queue="empty"}'] == 0
    assert not any('queue="broken"' in k for k in m)  # left out, the scrape goes on
    depths.append(9)  # read at each scrape, not at registration
    assert parse(metrics)['voice_agent_queue_depth_max{queue="send"}'] == 9


def test_collectors_and_engine_stats_are_read_at_scrape_time() -> None:
    class Stub(ScriptedEngine):
        calls = 0

        def runtime_stats(self) -> EngineStats:
            self.calls += 1
            return EngineStats(batch_size=3, kv_cache_bytes=4096, queued=2)

    engine = Stub()
    metrics = Metrics()
    metrics.watch_engine(engine)
    assert engine.calls == 0  # nothing is read until a scrape
    value = [5.0]
    metrics.add_collector(lambda: [counter("things", "things seen", value[0])])
    metrics.add_collector(lambda: [gauge("broken", "never there", 1 / 0)])
    m = parse(metrics)
    assert engine.calls > 0
    assert m["voice_agent_engine_batch_size"] == 3
    assert m["voice_agent_engine_kv_cache_bytes"] == 4096
    assert m['voice_agent_queue_depth{queue="engine"}'] == 2
    assert m["voice_agent_things_total"] == 5
    assert "voice_agent_broken" not in m


async def test_engine_defaults_and_the_scripted_engine() -> None:
    engine = ScriptedEngine(["one two three"], token_delay=0.001)
    assert not await engine.ready()  # not started
    await engine.start()
    try:
        assert await engine.ready()
        conv = engine.new_conversation()
        handle = engine.submit(conv, TurnInput(text="hi"))
        assert engine.runtime_stats().batch_size == 1
        async for _ in handle:
            pass
        assert engine.runtime_stats() == EngineStats()
    finally:
        await engine.close()


# ------------------------------------------------------------ DeferredEngine


async def test_deferred_engine_loads_on_a_thread_at_start(
    caplog: pytest.LogCaptureFixture,
) -> None:
    gate = threading.Event()
    threads: list[str] = []
    inner = ScriptedEngine(["loaded reply"], token_delay=0.001)

    def load() -> ScriptedEngine:
        threads.append(threading.current_thread().name)
        assert gate.wait(20)
        return inner

    engine = DeferredEngine(load, "some/model", progress_every=0.05)
    with pytest.raises(EngineError, match="loading"):
        engine.new_conversation()
    assert engine.runtime_stats() == EngineStats() and not await engine.ready()
    other = ScriptedEngine().new_conversation()
    assert not engine.prefill_speculative(other, np.zeros(160, dtype=np.float32))
    caplog.set_level(logging.INFO, logger="voice_agent.engine")
    start = asyncio.create_task(engine.start())
    async with asyncio.timeout(20):
        while "still loading" not in caplog.text:  # progress while the load runs
            await asyncio.sleep(0.02)
    assert not start.done() and engine.loading_seconds() > 0
    assert engine.model_name == "some/model"
    gate.set()
    await asyncio.wait_for(start, 20)
    try:
        assert threads and threads[0] != threading.current_thread().name
        assert engine.loaded and engine.inner is inner and inner.started
        assert engine.model_name == "scripted" and engine.loading_seconds() == 0
        assert await engine.ready()
        conv = engine.new_conversation("be brief")
        handle = engine.submit(conv, TurnInput(text="hi"))
        async for _ in handle:
            pass
        assert handle.result.text == "loaded reply"
    finally:
        await engine.close()
    assert not inner.started


async def test_deferred_engine_load_failure_is_raised_by_start() -> None:
    def load() -> ScriptedEngine:
        raise ModelLoadError("cannot load model 'x': no such directory")

    engine = DeferredEngine(load, "x")
    with pytest.raises(ModelLoadError, match="no such directory"):
        await engine.start()
    assert not engine.loaded and not await engine.ready()
    await engine.close()  # nothing to close; no error
