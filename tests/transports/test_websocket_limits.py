"""Limits of the WebSocket transport: admission (sessions, per address, the
model loading), rate limits, the idle close, and a client that stops reading."""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
from dataclasses import replace

import pytest
from websockets.asyncio.client import connect as ws_connect

from tests.helpers.waiting import until
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import ErrorEvent, ReplyDone
from voice_agent.transports.websocket import running_server

from . import ws_support
from .ws_support import WAIT, close_of, echo, scrape

pytestmark = pytest.mark.timeout(60)

# the fixtures of ws_support that the tests below use
web_dir = ws_support.web_dir
config = ws_support.config


async def test_session_limit_closes_with_1013(config: Config) -> None:
    engine = ScriptedEngine(echo, token_delay=0.001)
    async with running_server(replace(config, max_sessions=2), engine) as app:
        async with RealtimeClient(app.url) as a, RealtimeClient(app.url) as b:
            await a.start()
            await b.start()
            code, reason = await close_of(app.url)
            assert code == 1013 and reason == "server at its session limit, try again later"
            await a.send_text("still served")
            assert (await a.wait_for(ReplyDone)).text == "echo still served"
        await until(lambda: not app.sessions and not app.host.admission.open)
        async with RealtimeClient(app.url) as d:
            assert (await d.start()).model == "scripted"
        metrics = await scrape(app.port)
    key = 'voice_agent_transport_errors_total{code="server_full",transport="realtime"}'
    assert metrics[key] == 1
    assert app.host.admission.refused == {"server_full": 1}


async def test_connections_per_client_address(config: Config) -> None:
    cfg = replace(config, max_connections_per_client=2)
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        async with RealtimeClient(app.url) as a, RealtimeClient(app.url) as b:
            await a.start()
            await b.start()
            code, reason = await close_of(app.url)
            assert code == 1013 and reason == "too many connections from this address"
            await a.send_text("still served")
            assert (await a.wait_for(ReplyDone, WAIT)).text == "echo still served"
        await until(lambda: app.host.admission.held_by("127.0.0.1") == 0)
        async with RealtimeClient(app.url) as d:
            assert (await d.start()).model == "scripted"
        assert (await scrape(app.port))["voice_agent_client_limit_total"] == 1


async def test_a_connection_while_shutting_down_is_closed_with_1001(config: Config) -> None:
    async with running_server(config, ScriptedEngine(echo, token_delay=0.001)) as app:
        app.host.begin_shutdown()  # as the server does first when it stops
        code, reason = await close_of(app.url)
        assert (code, reason) == (1001, "server shutting down")


async def test_idle_session_is_closed_but_not_while_a_reply_runs(config: Config) -> None:
    cfg = replace(config, idle_timeout=0.3)
    engine = ScriptedEngine([" ".join(["w"] * 100)], token_delay=0.01)  # about 1 s
    async with running_server(cfg, engine) as app:
        async with RealtimeClient(app.url) as client:
            await client.start()
            await client.send_text("a long answer please")
            done = await client.wait_for(ReplyDone, WAIT)  # not closed while it ran
            assert done.text.count("w") == 100
            assert await client.wait_closed(WAIT) == 1000
        metrics = await scrape(app.port)
        assert metrics["voice_agent_idle_closes_total"] == 1
        key = 'voice_agent_transport_errors_total{code="idle",transport="realtime"}'
        assert metrics[key] == 1


def test_token_bucket_limits_with_a_fake_clock() -> None:
    from voice_agent.limits import AudioPacer, MessageLimiter

    now = [0.0]
    limiter = MessageLimiter(10.0, lambda: now[0])
    waits = [limiter.message() for _ in range(15)]
    assert waits[:10] == [0.0] * 10  # a burst of one second's worth
    assert waits[10:] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    now[0] += 0.5  # the reader waited as told
    assert limiter.message() == pytest.approx(0.1)
    now[0] += 10.0
    assert limiter.message() == 0.0  # refilled, but not beyond the burst
    assert limiter.level == pytest.approx(9.0)

    pacer = AudioPacer(2.0, lambda: now[0], burst_s=4.0)
    assert pacer.audio(4.0) == 0.0  # the allowance
    assert pacer.audio(2.0) == pytest.approx(1.0)  # 2 s of audio at 2x: 1 s
    now[0] += 1.0
    assert pacer.audio(0.02) == pytest.approx(0.01)
    # real time (1x) never waits once the allowance is spent
    steady = AudioPacer(1.5, lambda: now[0], burst_s=1.0)
    for _ in range(500):
        assert steady.audio(0.02) == 0.0
        now[0] += 0.02
    assert pacer.throttled_s == pytest.approx(1.01)


async def test_audio_faster_than_real_time_is_throttled(config: Config) -> None:
    cfg = replace(config, max_audio_speed=8.0)
    async with running_server(cfg, ScriptedEngine(echo, token_delay=0.001)) as app:
        async with RealtimeClient(app.url) as client:
            await client.start()
            frame = bytes(16000)  # 0.5 s of silence
            for _ in range(30):  # 15 s sent as fast as the socket takes it
                await client.send_audio(frame)
            await client.send_text("after the flood")
            assert (await client.wait_for(ReplyDone, 30)).text == "echo after the flood"
            assert client.close_code is None
        # 15 s at 8x after a 10 s allowance
        assert (await scrape(app.port))["voice_agent_throttled_seconds_total"] > 0.0


async def test_client_that_never_reads_is_closed_and_others_are_unaffected(
    config: Config,
) -> None:
    # random text: permessage-deflate cannot shrink it
    flood = "".join(" " + secrets.token_urlsafe(3000) for _ in range(4000))
    engine = ScriptedEngine(
        lambda turn: flood if turn.text == "flood" else f"echo {turn.text}",
        token_delay=0.0,
    )
    cfg = replace(config, send_queue=32, max_new_tokens=4000)
    async with running_server(cfg, engine) as app:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", app.port))
        sock.setblocking(False)
        # max_queue=1: the client library stops reading after one message
        async with ws_connect(app.url, sock=sock, max_queue=1) as lazy:
            await lazy.send(json.dumps({"type": "session.start"}))
            await lazy.send(json.dumps({"type": "text", "text": "flood"}))
            async with RealtimeClient(app.url) as good:
                await good.start()
                async with asyncio.timeout(60):
                    while app.counters["slow_consumer_closes_total"] < 1:
                        await good.send_text("ping")
                        assert (await good.wait_for(ReplyDone, WAIT)).text == "echo ping"
                        # the server never holds more than the queue for it
                        metrics = await scrape(app.port)
                        assert metrics['voice_agent_queue_depth_max{queue="send"}'] <= 32
                await until(lambda: len(app.sessions) <= 1, 30)  # the slow one is gone
                key = 'voice_agent_transport_errors_total{code="slow_client",transport="realtime"}'
                assert (await scrape(app.port))[key] == 1
                await good.send_text("after")
                assert (await good.wait_for(ReplyDone, WAIT)).text == "echo after"
                assert not good.of_type(ErrorEvent) and good.close_code is None
            lazy.transport.abort()  # its close handshake would wait on its own full buffer
        # its generation was cancelled, not run to the end
        await until(lambda: engine.runtime_stats().batch_size == 0)
        flood_conversation = next(c for c, t in engine.submitted if t.text == "flood")
        history = engine.history_text(flood_conversation)
        assert 0 < len(history) < len(flood) // 2
