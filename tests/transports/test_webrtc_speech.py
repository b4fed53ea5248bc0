"""Spoken replies over WebRTC: the reply audio goes out on the peer
connection's track, a cancel drops what it holds, a silent session
answers recvonly."""

from __future__ import annotations

import numpy as np
import pytest
from aiortc import RTCPeerConnection

from tests.helpers.speech import voiced_fraction
from tests.helpers.waiting import until
from voice_agent.client import RealtimeClient
from voice_agent.protocol import (
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
)
from voice_agent.transports.websocket import WebSocketServerApp

from . import webrtc_support
from .webrtc_support import (
    RATE,
    PcmTrack,
    make_offer,
    negotiate,
    speaking_peer,
)

pytestmark = pytest.mark.timeout(120)

# the fixtures of webrtc_support that the tests below use
app = webrtc_support.app
peers = webrtc_support.peers
speaking_app = webrtc_support.speaking_app


async def test_spoken_replies_go_out_on_the_peer_connections_track(
    speaking_app: WebSocketServerApp, peers: list[RTCPeerConnection]
) -> None:
    async with RealtimeClient(speaking_app.url) as client:
        sid = (await client.start()).session_id
        recorders, answer = await speaking_peer(client, peers)
        assert "a=sendrecv" in answer  # the microphone in, the spoken replies out
        peer = speaking_app.peers[sid]
        track = peer.reply_track
        assert track is not None
        await until(lambda: peer.sending)
        # the track is live before anything is said: silence frames arrive
        await until(lambda: recorders[0].frames >= 5)
        assert not any(recorders[0].pcm)

        await client.send_text("lights please")
        started = await client.wait_for(ReplyAudioStarted, 30)
        done = await client.wait_for(ReplyAudioDone, 30)
        assert started.reply_id == done.reply_id == "r1"
        assert not done.cancelled and done.duration_ms > 2000
        await until(lambda: track.buffered_ms == 0)  # all of it handed to aiortc
        heard = len(recorders[0].pcm)
        await until(lambda: len(recorders[0].pcm) >= heard + 16000)  # and 0.5 s more
        await recorders[0].stop()

        # the events came on the WebSocket, the audio only on the track
        assert client.audio_bytes == 0
        assert track.audio_frames_sent * 20 >= done.duration_ms - 40
        pcm = bytes(recorders[0].pcm)
        assert voiced_fraction(pcm, 16000) > 0.2  # speech, decoded from Opus
        level = np.abs(np.frombuffer(pcm, np.int16))
        assert level.max() > 3000


async def test_cancel_drops_what_the_track_holds(
    speaking_app: WebSocketServerApp, peers: list[RTCPeerConnection]
) -> None:
    async with RealtimeClient(speaking_app.url) as client:
        sid = (await client.start()).session_id
        recorders, _ = await speaking_peer(client, peers)
        track = speaking_app.peers[sid].reply_track
        assert track is not None
        await until(lambda: speaking_app.peers[sid].sending)
        await client.send_text("talk")  # about 60 sentences
        await client.wait_for(ReplyAudioStarted, 30)
        await until(lambda: track.audio_frames_sent >= 25)  # half a second heard
        assert track.buffered_ms > 0  # the speaker runs ahead of what is played

        await client.cancel()
        await client.wait_for(ReplyCancelled, 30)
        done = await client.wait_for(ReplyAudioDone, 30)
        assert done.cancelled
        assert track.buffered_ms == 0 and track.cleared_ms > 0
        sent, frames = track.audio_frames_sent, track.frames_sent
        await until(lambda: track.frames_sent >= frames + 25)  # the track goes on...
        assert track.audio_frames_sent == sent  # ...with silence: no reply audio after it
        assert client.audio_bytes == 0
        await recorders[0].stop()


async def test_a_session_that_does_not_speak_answers_recvonly(
    speaking_app: WebSocketServerApp, peers: list[RTCPeerConnection]
) -> None:
    async with RealtimeClient(speaking_app.url) as client:
        sid = (await client.start(speak=False)).session_id
        pc = await make_offer(PcmTrack(np.zeros(RATE, np.int16)))
        peers.append(pc)
        answer = await negotiate(client, pc)
        assert "a=recvonly" in answer and "a=sendrecv" not in answer
        assert speaking_app.peers[sid].reply_track is None
