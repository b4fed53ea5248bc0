"""Errors on the WebSocket transport: malformed messages, failing turns and
frames, clients that vanish; one client's trouble never reaches another."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from tests.helpers.waiting import until
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import ErrorEvent, ReplyDelta, ReplyDone
from voice_agent.transports.websocket import WebSocketServerApp, running_server

from . import ws_support
from .ws_support import WAIT, keep_talking, scrape

pytestmark = pytest.mark.timeout(60)

# the fixtures of ws_support that the tests below use
web_dir = ws_support.web_dir
config = ws_support.config
app = ws_support.app


async def test_malformed_messages_while_another_client_is_served(
    app: WebSocketServerApp,
) -> None:
    stop = asyncio.Event()
    replies: list[str] = []
    other = asyncio.create_task(keep_talking(app.url, stop, replies))
    try:
        async with RealtimeClient(app.url) as client:

            async def expect(code: str) -> None:
                error = await client.wait_for(ErrorEvent, 10)
                assert error.code == code

            await client.send_raw(b"\x01\x00")  # audio before session.start
            await expect("not_started")
            await client.send_raw(json.dumps({"type": "text", "text": "hi"}))
            await expect("not_started")
            await client.send_raw("this is not JSON")
            await expect("bad_message")
            await client.send_raw(json.dumps({"type": "does.not.exist"}))
            await expect("bad_message")
            await client.send_raw(json.dumps({"no_type": 1}))
            await expect("bad_message")
            await client.send_raw(json.dumps({"type": "session.start", "sample_rate": 7000}))
            await expect("bad_audio")
            await client.send_raw(json.dumps({"type": "session.start", "channels": "two"}))
            await expect("bad_message")
            started = await client.start()
            assert started.model == "scripted" and started.sample_rate == 16000
            await client.send_raw(b"\x00\x00\x00")  # odd byte count
            await expect("bad_audio")
            await client.send_raw(json.dumps({"type": "text", "text": 5}))
            await expect("bad_message")
            await client.send_raw(json.dumps({"type": "text", "text": "x" * 5000}))
            await expect("bad_message")
            await client.send_raw(json.dumps({"type": "webrtc.offer", "sdp": "v=0"}))
            error = await client.wait_for(ErrorEvent, 10)
            # aiortc is installed (the webrtc extra): a bad SDP is refused
            assert error.code == "bad_message"
            assert error.message.startswith("invalid webrtc offer")
            await client.send_raw(json.dumps({"type": "session.start"}))
            await expect("bad_message")
            await client.send_raw(
                json.dumps({"type": "playback", "reply_id": "r1", "played_ms": 10})
            )
            await client.send_audio(bytes(640))  # whole samples are fine again
            await client.commit()
            await client.cancel()
            # the connection is still open and still works
            await client.send_text("still here")
            reply = await client.wait_for(ReplyDone, WAIT)
            assert reply.text == "echo still here"
            assert len(client.of_type(ErrorEvent)) == 12
            assert client.close_code is None
        metrics = await scrape(app.port)
        # counted once each, by code and by transport (host.report)
        assert metrics['voice_agent_errors_total{code="bad_message"}'] == 8
        key = 'voice_agent_transport_errors_total{code="not_started",transport="realtime"}'
        assert metrics[key] == 2

        # a frame over max_message_bytes closes that connection with 1009
        async with RealtimeClient(app.url) as big:
            await big.start()
            await big.send_audio(bytes(2**20))
            assert await big.wait_closed(WAIT) == 1009
        assert len(replies) >= 1
    finally:
        stop.set()
        close_code = await asyncio.wait_for(other, 30)
    assert close_code is None or close_code == 1000
    assert replies == [f"echo turn {i + 1}" for i in range(len(replies))]


async def test_a_failing_turn_fails_only_its_session(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    def reply(turn: TurnInput) -> str:
        if turn.text == "boom":
            raise RuntimeError("secret model detail")
        return f"echo {turn.text}"

    async with running_server(config, ScriptedEngine(reply, token_delay=0.002)) as app:
        stop = asyncio.Event()
        replies: list[str] = []
        other = asyncio.create_task(keep_talking(app.url, stop, replies))
        try:
            async with RealtimeClient(app.url) as client:
                await client.start()
                await client.send_text("boom")
                error = await client.wait_for(ErrorEvent, WAIT)
                assert error.code == "internal" and "secret" not in error.message
                await client.send_text("fine")
                assert (await client.wait_for(ReplyDone, WAIT)).text == "echo fine"
                # a bug while handling a message: `internal`, no exception text
                assert client.session is not None
                live = app.sessions[client.session.session_id]

                async def broken(text: str) -> None:
                    raise RuntimeError("secret handler detail")

                monkeypatch.setattr(live, "text", broken)
                await client.send_text("again")
                error = await client.wait_for(ErrorEvent, WAIT)
                assert (error.code, error.message) == ("internal", "internal server error")
                await client.send_audio(bytes(640))  # the connection goes on
                assert client.close_code is None
        finally:
            stop.set()
            assert await asyncio.wait_for(other, 30) in (None, 1000)
        assert replies == [f"echo turn {i + 1}" for i in range(len(replies))]


async def test_a_frame_that_fails_on_the_fast_path_gets_internal_and_the_session_lives(
    app: WebSocketServerApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voice_agent.session import Session

    original = Session.feed_audio

    def feed(self: Session, pcm: bytes) -> object:
        if len(pcm) == 642:
            raise RuntimeError("boom")
        return original(self, pcm)

    monkeypatch.setattr(Session, "feed_audio", feed)
    async with RealtimeClient(app.url) as client:
        await client.start()
        for _ in range(10):
            await client.send_audio(bytes(640))
            await asyncio.sleep(0.005)
        await client.send_audio(bytes(642))
        error = await client.wait_for(ErrorEvent, 10)
        assert error.code == "internal"
        await client.send_audio(bytes(640))
        await client.send_text("still here")
        assert (await client.wait_for(ReplyDone, WAIT)).text == "echo still here"
        assert client.close_code is None
        # the ten frames and the failing one (the handler was idle for each)
        assert app.fast_frames >= 11


async def test_client_leaving_mid_reply_cancels_its_generation(config: Config) -> None:
    engine = ScriptedEngine([" ".join(["w"] * 5000)], token_delay=0.01)  # 50 s if not stopped
    cfg = replace(config, max_new_tokens=5000)
    async with running_server(cfg, engine) as app:
        client = RealtimeClient(app.url)
        await client.connect()
        await client.start()
        await client.send_text("talk")
        await client.wait_for(ReplyDelta, WAIT)
        client.ws.transport.abort()  # gone without a close handshake
        await until(lambda: not engine.runtime_stats().batch_size and not app.sessions)
        conversation = engine.submitted[0][0]
        assert 0 < engine.history_text(conversation).count("w") < 1000  # not all 5000
        await client.close()
