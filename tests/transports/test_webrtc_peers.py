"""Real aiortc peer connections to a real server on a loopback port: speech
in over the track, offers, closing from either side, shutdown, formats."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, VideoStreamTrack

from tests.helpers.waiting import until
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import (
    ErrorEvent,
    ReplyDone,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    WebRTCAnswer,
)
from voice_agent.transports.webrtc import (
    WebRTCInput,
)
from voice_agent.transports.websocket import WebSocketServerApp, running_server

from . import webrtc_support
from .webrtc_support import (
    FRAME,
    LEAD_S,
    RATE,
    PcmTrack,
    candidate_addresses,
    client_dtls_state,
    make_offer,
    negotiate,
    reply,
    speech,
)

pytestmark = pytest.mark.timeout(120)

# the fixtures of webrtc_support that the tests below use
app = webrtc_support.app
peers = webrtc_support.peers


# ----------------------------------------------------- real peer connections


async def test_speech_over_webrtc_gets_speech_events_and_a_reply(
    app: WebSocketServerApp, audio_dir: Path, peers: list[RTCPeerConnection]
) -> None:
    # Reference: the same audio as binary WebSocket frames (16 kHz PCM16).
    async with RealtimeClient(app.url) as ws_client:
        await ws_client.start()
        pcm16 = speech(audio_dir, 16000).tobytes()
        for i in range(0, len(pcm16), 640):
            await ws_client.send_audio(pcm16[i : i + 640])
        ws_stopped = await ws_client.wait_for(SpeechStoppedEvent, 30)
        ws_started = ws_client.of_type(SpeechStartedEvent)[0]

    async with RealtimeClient(app.url) as client:
        started = await client.start()
        track = PcmTrack(speech(audio_dir, RATE))
        pc = await make_offer(track)
        peers.append(pc)
        answer = await negotiate(client, pc)

        addresses = candidate_addresses(answer)
        assert addresses and all(a == "127.0.0.1" for a in addresses), addresses
        assert "a=recvonly" in answer  # the server does not speak: audio in only
        assert "opus/48000/2" in answer

        speech_started = await client.wait_for(SpeechStartedEvent, 30)
        speech_stopped = await client.wait_for(SpeechStoppedEvent, 30)
        done = await client.wait_for(ReplyDone, 30)
        assert done.text == "heard audio"
        assert pc.connectionState == "connected"

        peer = app.peers[started.session_id]
        assert peer.connection_state == "connected"
        assert peer.frames_received > 100  # the clip arrived as frames, not one burst
        assert speech_stopped.utterance_id == speech_started.utterance_id
        # Stream positions match the WebSocket reference: the Opus track was
        # decoded and resampled to 16 kHz mono (a wrong rate or channel count
        # would scale or garble them).
        assert abs(speech_started.start_ms - ws_started.start_ms) <= 120
        assert abs(speech_stopped.end_ms - ws_stopped.end_ms) <= 120
        assert len(client.of_type(SpeechStartedEvent)) == 1


async def test_closing_the_websocket_closes_the_peer_connection(
    app: WebSocketServerApp, audio_dir: Path, peers: list[RTCPeerConnection]
) -> None:
    client = RealtimeClient(app.url)
    await client.connect()
    try:
        sid = (await client.start()).session_id
        pc = await make_offer(PcmTrack(speech(audio_dir, RATE), speed=2.0))
        peers.append(pc)
        await negotiate(client, pc)
        await client.wait_for(SpeechStartedEvent, 30)  # audio flows
        peer = app.peers[sid]
        server_pc = peer.pc
        assert server_pc is not None and server_pc.connectionState == "connected"
        tasks = set(peer.tasks)
        assert len(tasks) == 2 and not any(t.done() for t in tasks)
        server_dtls = server_pc.getTransceivers()[0].receiver.transport
    finally:
        await client.close()

    # The server tears the peer down by itself (nothing here calls close()).
    await until(lambda: not app.peers and not app.sessions)
    await until(lambda: server_pc.connectionState == "closed")
    await until(lambda: all(t.done() for t in tasks))
    assert peer.closed and peer.pc is None and peer.connection_state == "closed"
    assert server_dtls.state == "closed"
    assert server_dtls.transport.state == "closed"  # the ICE transport and its sockets
    # The client's peer connection hears the server's DTLS close.
    await until(lambda: client_dtls_state(pc) == "closed")


async def test_client_closing_its_side_frees_the_peer_and_the_socket_goes_on(
    app: WebSocketServerApp, audio_dir: Path, peers: list[RTCPeerConnection]
) -> None:
    async with RealtimeClient(app.url) as client:
        sid = (await client.start()).session_id
        # No tail of silence: the utterance is still open when the client hangs up.
        clip = speech(audio_dir, RATE)[: int((LEAD_S + 2.0) * RATE)]
        track = PcmTrack(clip)
        pc = await make_offer(track)
        peers.append(pc)
        await negotiate(client, pc)
        opened = await client.wait_for(SpeechStartedEvent, 30)
        peer = app.peers[sid]
        await until(lambda: track.frames_sent * FRAME >= len(clip))
        await pc.close()

        # The end of the stream closes the open utterance, which gets its reply.
        stopped = await client.wait_for(SpeechStoppedEvent, 30)
        assert stopped.utterance_id == opened.utterance_id
        assert (await client.wait_for(ReplyDone, 30)).text == "heard audio"
        await until(lambda: peer.closed and peer.pc is None)
        await until(lambda: all(t.done() for t in peer.tasks))

        await client.send_text("still here")
        assert (await client.wait_for(ReplyDone, 30)).text == "echo still here"

        # A new offer on the same socket replaces the closed peer.
        pc2 = await make_offer(PcmTrack(speech(audio_dir, RATE), speed=2.0))
        peers.append(pc2)
        await negotiate(client, pc2)
        await client.wait_for(SpeechStartedEvent, 30)
        assert app.peers[sid] is not peer and app.peers[sid].connection_state == "connected"


async def test_a_second_offer_replaces_the_first(
    app: WebSocketServerApp, audio_dir: Path, peers: list[RTCPeerConnection]
) -> None:
    async with RealtimeClient(app.url) as client:
        sid = (await client.start()).session_id
        first_pc = await make_offer(PcmTrack(np.zeros(RATE, np.int16)))
        peers.append(first_pc)
        await negotiate(client, first_pc)
        first = app.peers[sid]
        await until(lambda: first.connection_state == "connected")

        second_pc = await make_offer(PcmTrack(speech(audio_dir, RATE), speed=2.0))
        peers.append(second_pc)
        await negotiate(client, second_pc)
        assert first.closed and first.pc is None
        assert all(t.done() for t in first.tasks)
        assert app.peers[sid] is not first
        await client.wait_for(SpeechStartedEvent, 30)
        await until(lambda: client_dtls_state(first_pc) == "closed")


async def _offer_sdp(*tracks: Any) -> str:
    pc = await make_offer(*tracks)
    assert pc.localDescription is not None
    sdp = str(pc.localDescription.sdp)
    await pc.close()
    return sdp


async def test_a_malformed_offer_is_a_bad_message_and_the_socket_goes_on(
    app: WebSocketServerApp, audio_dir: Path, peers: list[RTCPeerConnection]
) -> None:
    good = await _offer_sdp(AudioStreamTrack())
    bad = {
        "not sdp": "hello",
        "empty": "",
        "video only": await _offer_sdp(VideoStreamTrack()),
        "no candidates": re.sub(r"a=candidate:[^\r\n]*\r\n", "", good),
        "only a LAN candidate": good.replace("127.0.0.1", "192.168.1.20"),
        "no codec in common": re.sub(r"(a=rtpmap:\d+ )\w+/", r"\1nope/", good),
        "no ICE credentials": re.sub(r"a=ice-(ufrag|pwd):[^\r\n]*\r\n", "", good),
        "no fingerprint": re.sub(r"a=fingerprint:[^\r\n]*\r\n", "", good),
        "broken m-line": good.replace("m=audio ", "m=audio x"),
        "half": good[: len(good) // 2],
    }
    async with RealtimeClient(app.url) as client:
        sid = (await client.start()).session_id
        for name, sdp in bad.items():
            await client.send_json({"type": "webrtc.offer", "sdp": sdp})
            error = await client.wait_for(ErrorEvent, 30)
            assert error.code == "bad_message", name
            assert error.message.startswith("invalid webrtc offer"), (name, error.message)
            assert sid not in app.peers, name
        assert not client.of_type(WebRTCAnswer)
        assert client.close_code is None

        await client.send_text("hi")
        assert (await client.wait_for(ReplyDone, 30)).text == "echo hi"

        pc = await make_offer(PcmTrack(speech(audio_dir, RATE), speed=2.0))
        peers.append(pc)
        await negotiate(client, pc)
        await client.wait_for(SpeechStartedEvent, 30)


async def test_offer_before_session_start_is_refused(app: WebSocketServerApp) -> None:
    async with RealtimeClient(app.url) as client:
        await client.send_json(
            {"type": "webrtc.offer", "sdp": await _offer_sdp(AudioStreamTrack())}
        )
        error = await client.wait_for(ErrorEvent, 30)
        assert error.code == "not_started"
        assert not app.peers


async def test_shutdown_closes_the_peer_connections(
    audio_dir: Path, peers: list[RTCPeerConnection]
) -> None:
    config = Config(host="127.0.0.1", port=0)
    engine = ScriptedEngine(reply, token_delay=0.001)
    async with running_server(config, engine) as app, RealtimeClient(app.url) as client:
        sid = (await client.start()).session_id
        pc = await make_offer(PcmTrack(speech(audio_dir, RATE), speed=2.0))
        peers.append(pc)
        await negotiate(client, pc)
        await client.wait_for(SpeechStartedEvent, 30)
        peer = app.peers[sid]
        await app.shutdown()
        assert peer.closed and peer.pc is None and not app.peers
        assert all(t.done() for t in peer.tasks)
        assert await client.wait_closed(20) == 1001
        await until(lambda: client_dtls_state(pc) == "closed")


async def test_input_converts_to_the_session_format(
    audio_dir: Path, peers: list[RTCPeerConnection]
) -> None:
    """A session declared as 48 kHz stereo gets 48 kHz stereo PCM from the track."""
    fed: list[bytes] = []

    class Live:
        session_id = "s"

        async def feed_audio(self, pcm: bytes) -> None:
            fed.append(pcm)

        async def commit(self) -> None:
            fed.append(b"")

    peer = WebRTCInput(Live(), sample_rate=48000, channels=2, host_addresses=("127.0.0.1",))  # type: ignore[arg-type]
    try:
        pc = await make_offer(PcmTrack(speech(audio_dir, RATE), speed=2.0))
        peers.append(pc)
        assert pc.localDescription is not None
        answer = await peer.accept(pc.localDescription.sdp)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        await until(lambda: sum(map(len, fed)) >= 48000 * 2 * 2)  # 1 s
        assert all(len(chunk) % 4 == 0 for chunk in fed)  # whole stereo int16 frames
        samples = np.frombuffer(b"".join(fed), np.int16).reshape(-1, 2)
        left, right = samples[:, 0].astype(np.float64), samples[:, 1].astype(np.float64)
        assert np.corrcoef(left, right)[0, 1] > 0.99  # the mono source on both channels
        assert np.abs(samples).max() > 1000  # the speech, not silence
        await pc.close()
        await until(lambda: b"" in fed)  # the end of stream was passed on
    finally:
        await peer.close()
    assert peer.pc is None and all(t.done() for t in peer.tasks)
