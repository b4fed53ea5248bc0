"""WebRTC input (aiortc): ICE configuration, candidates, and real peer
connections to a real server on a free loopback port.

The client side is a real aiortc RTCPeerConnection whose audio track plays a
recording from ../shared/audio as 20 ms frames at 48 kHz (Opus on the wire),
negotiated with `webrtc.offer` / `webrtc.answer` over the session WebSocket.
Only loopback addresses are used: the server binds 127.0.0.1 (so its host
candidates are loopback only) and the client gathers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import fractions
import json
import re
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aioice.ice
import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack
from aiortc.rtcicetransport import connection_kwargs

from tests.helpers.speech import voiced_fraction
from voice_agent.audio import decode, float_to_pcm16, resample
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import ConfigError
from voice_agent.protocol import (
    ErrorEvent,
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyDone,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    WebRTCAnswer,
)
from voice_agent.transports import webrtc
from voice_agent.transports.webrtc import (
    IceServer,
    WebRTCInput,
    host_addresses_for_bind,
    host_candidates,
    keep_candidates,
    loopback_candidates,
    parse_ice_server,
    parse_ice_servers,
    rtc_configuration,
)
from voice_agent.transports.websocket import WebSocketServerApp, running_server
from voice_agent.tts.espeak import EspeakTTS
from voice_agent.tts.speaker import Speech

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
CLIP = "ldc93s1-16k-mono.wav"  # "She had your dark suit in greasy wash water all year." 2.92 s
RATE = 48000
FRAME = RATE // 50  # 20 ms
LEAD_S = 0.5  # silence before the clip
TAIL_S = 1.5  # silence after it: longer than the 600 ms hangover


# ------------------------------------------------------------------ helpers


class PcmTrack(AudioStreamTrack):
    """An audio track playing int16 mono PCM at 48 kHz in 20 ms frames, paced
    at `speed` times real time, then silence until stopped."""

    def __init__(self, pcm: np.ndarray[Any, Any], speed: float = 1.0) -> None:
        super().__init__()
        self.pcm = pcm
        self.speed = speed
        self.frames_sent = 0
        self._t0: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        pts = self.frames_sent * FRAME
        if self._t0 is None:
            self._t0 = time.monotonic()
        else:
            wait = self._t0 + pts / RATE / self.speed - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        chunk = self.pcm[pts : pts + FRAME]
        if len(chunk) < FRAME:
            chunk = np.concatenate([chunk, np.zeros(FRAME - len(chunk), np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, RATE)
        self.frames_sent += 1
        return frame


def speech(audio_dir: Path, rate: int) -> np.ndarray[Any, Any]:
    """The clip with LEAD_S of silence before and TAIL_S after, int16 mono at `rate`."""
    clip = decode(audio_dir / CLIP)  # float32 mono at 16 kHz
    if rate != 16000:
        clip = resample(clip, 16000, rate)
    full = np.concatenate(
        [np.zeros(int(LEAD_S * rate), np.float32), clip, np.zeros(int(TAIL_S * rate), np.float32)]
    )
    return np.frombuffer(float_to_pcm16(full), np.int16)


def candidate_addresses(sdp: str) -> list[str]:
    return [line.split()[4] for line in sdp.splitlines() if line.startswith("a=candidate:")]


async def make_offer(*tracks: Any) -> RTCPeerConnection:
    """A client peer connection with `tracks`, its offer gathered on loopback."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for track in tracks:
        pc.addTrack(track)
    with loopback_candidates():
        await pc.setLocalDescription(await pc.createOffer())
    return pc


async def negotiate(client: RealtimeClient, pc: RTCPeerConnection) -> str:
    """Send the offer, apply the answer; the answer SDP."""
    assert pc.localDescription is not None
    await client.send_json({"type": "webrtc.offer", "sdp": pc.localDescription.sdp})
    answer = await client.wait_for(WebRTCAnswer, 30)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
    return answer.sdp


def client_dtls_state(pc: RTCPeerConnection) -> str:
    return str(pc.getTransceivers()[0].receiver.transport.state)


async def wait_until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll `predicate` (bounded); AssertionError when it never holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:g} s")
        await asyncio.sleep(0.02)


def reply(turn: TurnInput) -> str:
    return f"echo {turn.text}" if turn.text else "heard audio"


@pytest.fixture
async def app() -> AsyncIterator[WebSocketServerApp]:
    config = Config(host="127.0.0.1", port=0, ping_interval=5.0)
    async with running_server(config, ScriptedEngine(reply, token_delay=0.001)) as server:
        assert server.webrtc is not None, "aiortc is missing: install the webrtc extra"
        yield server


@pytest.fixture
async def peers() -> AsyncIterator[list[RTCPeerConnection]]:
    """Client peer connections, closed at the end of the test."""
    made: list[RTCPeerConnection] = []
    yield made
    await asyncio.gather(*(pc.close() for pc in made), return_exceptions=True)


# ------------------------------------------------------------ ICE servers


def test_parse_ice_server_accepts_stun_and_turn() -> None:
    assert parse_ice_server("stun:stun.example.org:3478") == IceServer("stun:stun.example.org:3478")
    assert parse_ice_server(" STUN:192.168.1.2 ") == IceServer("stun:192.168.1.2")
    assert parse_ice_server("turn:alice:s%40cr%3At@turn.example.org:3478") == IceServer(
        "turn:turn.example.org:3478", "alice", "s@cr:t"
    )
    assert parse_ice_server("turn:u:p@10.0.0.1:3478?transport=tcp") == IceServer(
        "turn:10.0.0.1:3478?transport=tcp", "u", "p"
    )
    assert parse_ice_server("turns:u:p@turn.example.org:5349?transport=tcp") == IceServer(
        "turns:turn.example.org:5349?transport=tcp", "u", "p"
    )


@pytest.mark.parametrize(
    "url",
    [
        "",
        "stun",
        "stun:",
        "http://stun.example.org",
        "example.org:3478",
        "stuns:stun.example.org:5349",  # aiortc would skip it silently
        "stun:u:p@stun.example.org:3478",  # credentials on STUN
        "turn:turn.example.org:3478",  # TURN without credentials
        "turn:alice@turn.example.org:3478",  # no password
        "turn::secret@turn.example.org:3478",  # no user
        "stun:stun.example.org:0",
        "stun:stun.example.org:99999",
        "stun:stun.example.org:port",
        "stun:[::1]:3478",  # aiortc cannot parse IPv6 literals
        "stun:stun.example.org?transport=udp",
        "turn:u:p@turn.example.org:3478?transport=tls",
        "turns:u:p@turn.example.org:5349?transport=udp",
    ],
)
def test_parse_ice_server_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="--ice-server"):
        parse_ice_server(url)


def test_ice_server_errors_never_repeat_the_password() -> None:
    for url in ("turn:u:hunter2@turn.example.org:3478?transport=tls", "turn:u:hunter2@:3478"):
        with pytest.raises(ConfigError) as info:
            parse_ice_server(url)
        assert "hunter2" not in str(info.value)


def test_parse_ice_servers_one_stun_and_one_turn_at_most() -> None:
    assert parse_ice_servers(()) == ()
    both = parse_ice_servers(["stun:a.example.org", "turn:u:p@b.example.org"])
    assert [s.url for s in both] == ["stun:a.example.org", "turn:b.example.org"]
    with pytest.raises(ConfigError, match="at most one STUN"):
        parse_ice_servers(["stun:a.example.org", "stun:b.example.org"])
    with pytest.raises(ConfigError, match="at most one STUN"):
        parse_ice_servers(["turn:u:p@a.example.org", "turn:u:p@b.example.org"])


def test_no_ice_servers_by_default() -> None:
    """An explicit empty list: aiortc would use a public STUN server for None."""
    assert Config().ice_servers == ()
    configuration = rtc_configuration(Config().ice_servers)
    assert configuration.iceServers == []
    assert connection_kwargs(configuration.iceServers) == {}  # aioice gets no server


def test_configured_ice_servers_reach_aioice() -> None:
    configuration = rtc_configuration(
        ["stun:stun.example.org:3479", "turn:al%20ice:pw@turn.example.org?transport=tcp"]
    )
    kwargs = connection_kwargs(configuration.iceServers)
    assert kwargs["stun_server"] == ("stun.example.org", 3479)
    assert kwargs["turn_server"] == ("turn.example.org", 3478)
    assert kwargs["turn_transport"] == "tcp"
    assert (kwargs["turn_username"], kwargs["turn_password"]) == ("al ice", "pw")


async def test_server_refuses_to_start_with_a_bad_ice_server() -> None:
    engine = ScriptedEngine(reply)
    app = WebSocketServerApp(Config(host="127.0.0.1", port=0, ice_servers=("stuns:x",)), engine)
    with pytest.raises(ConfigError, match="--ice-server"):
        await app.start()
    assert not engine.started


# ------------------------------------------------------------ ICE candidates


def test_host_addresses_for_bind() -> None:
    assert host_addresses_for_bind("127.0.0.1") == ("127.0.0.1",)
    assert host_addresses_for_bind("127.0.0.2") == ("127.0.0.2",)
    assert host_addresses_for_bind("localhost") == ("127.0.0.1",)
    assert host_addresses_for_bind("::1") == ("::1",)
    for host in ("0.0.0.0", "::", "", "192.168.1.10", "example.org"):
        assert host_addresses_for_bind(host) is None, host


SDP_WITH_CANDIDATES = "\r\n".join(
    [
        "v=0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
        "a=candidate:2 1 udp 2130706431 ::1 50001 typ host",
        "a=candidate:3 1 udp 2130706431 192.168.1.20 50002 typ host",
        "a=candidate:4 1 udp 2130706431 8d2f0a33-aaaa.local 50003 typ host",
        "a=candidate:5 1 udp 1694498815 203.0.113.7 50004 typ srflx raddr 0.0.0.0 rport 0",
        "a=candidate:6 broken",
        "a=end-of-candidates",
        "",
    ]
)


def test_keep_candidates_keeps_only_loopback_for_a_loopback_server() -> None:
    kept = keep_candidates(SDP_WITH_CANDIDATES, ("127.0.0.1",))
    assert candidate_addresses(kept) == ["127.0.0.1", "::1"]
    others = [line for line in SDP_WITH_CANDIDATES.splitlines() if "candidate:" not in line]
    assert [line for line in kept.splitlines() if "candidate:" not in line] == others
    assert kept.endswith("\r\n") and "a=end-of-candidates" in kept
    assert keep_candidates(SDP_WITH_CANDIDATES, None) == SDP_WITH_CANDIDATES


def test_host_candidates_choose_aioice_host_addresses() -> None:
    default = aioice.ice.get_host_addresses(True, True)
    assert "127.0.0.1" not in default and "::1" not in default  # aioice skips loopback
    with host_candidates(["127.0.0.1", "::1"]):
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(False, True) == ["::1"]
        with loopback_candidates():
            assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(True, True) == default
    hook = aioice.ice.get_host_addresses
    webrtc.install_host_address_hook()
    assert aioice.ice.get_host_addresses is hook  # installed once


async def test_a_loopback_client_offer_has_only_loopback_candidates(
    peers: list[RTCPeerConnection],
) -> None:
    pc = await make_offer(AudioStreamTrack())
    peers.append(pc)
    assert pc.localDescription is not None
    assert candidate_addresses(pc.localDescription.sdp) == ["127.0.0.1"]


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
    await wait_until(lambda: not app.peers and not app.sessions)
    await wait_until(lambda: server_pc.connectionState == "closed")
    await wait_until(lambda: all(t.done() for t in tasks))
    assert peer.closed and peer.pc is None and peer.connection_state == "closed"
    assert server_dtls.state == "closed"
    assert server_dtls.transport.state == "closed"  # the ICE transport and its sockets
    # The client's peer connection hears the server's DTLS close.
    await wait_until(lambda: client_dtls_state(pc) == "closed")


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
        await wait_until(lambda: track.frames_sent * FRAME >= len(clip))
        await pc.close()

        # The end of the stream closes the open utterance, which gets its reply.
        stopped = await client.wait_for(SpeechStoppedEvent, 30)
        assert stopped.utterance_id == opened.utterance_id
        assert (await client.wait_for(ReplyDone, 30)).text == "heard audio"
        await wait_until(lambda: peer.closed and peer.pc is None)
        await wait_until(lambda: all(t.done() for t in peer.tasks))

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
        await wait_until(lambda: first.connection_state == "connected")

        second_pc = await make_offer(PcmTrack(speech(audio_dir, RATE), speed=2.0))
        peers.append(second_pc)
        await negotiate(client, second_pc)
        assert first.closed and first.pc is None
        assert all(t.done() for t in first.tasks)
        assert app.peers[sid] is not first
        await client.wait_for(SpeechStartedEvent, 30)
        await wait_until(lambda: client_dtls_state(first_pc) == "closed")


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
        await wait_until(lambda: client_dtls_state(pc) == "closed")


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
        await wait_until(lambda: sum(map(len, fed)) >= 48000 * 2 * 2)  # 1 s
        assert all(len(chunk) % 4 == 0 for chunk in fed)  # whole stereo int16 frames
        samples = np.frombuffer(b"".join(fed), np.int16).reshape(-1, 2)
        left, right = samples[:, 0].astype(np.float64), samples[:, 1].astype(np.float64)
        assert np.corrcoef(left, right)[0, 1] > 0.99  # the mono source on both channels
        assert np.abs(samples).max() > 1000  # the speech, not silence
        await pc.close()
        await wait_until(lambda: b"" in fed)  # the end of stream was passed on
    finally:
        await peer.close()
    assert peer.pc is None and all(t.done() for t in peer.tasks)


# ---------------------------------------------------------- spoken replies

SPOKEN = "Sure, the kitchen light is on now. Anything else I can do for you?"
LONG_SPOKEN = " ".join(f"This is sentence number {n} of a very long answer." for n in range(60))


def spoken_reply(turn: TurnInput) -> str:
    return LONG_SPOKEN if turn.text == "talk" else SPOKEN


@pytest.fixture
async def speaking_app() -> AsyncIterator[WebSocketServerApp]:
    """A server that speaks its replies with espeak-ng."""
    speech_engine = Speech(EspeakTTS())
    config = Config(host="127.0.0.1", port=0, ping_interval=5.0, db="none")
    try:
        async with running_server(
            config, ScriptedEngine(spoken_reply, token_delay=0.01), speech=speech_engine
        ) as server:
            yield server
    finally:
        speech_engine.close()


class TrackRecorder:
    """Reads a received audio track to its end, as 16 kHz mono PCM16."""

    def __init__(self, track: Any) -> None:
        self.pcm = bytearray()
        self.frames = 0
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=16000)
        self.task = asyncio.create_task(self._run(track))

    async def _run(self, track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            self.frames += 1
            frame.pts = None
            for f in self._resampler.resample(frame):
                self.pcm += f.to_ndarray().tobytes()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def speaking_peer(
    client: RealtimeClient, peers: list[RTCPeerConnection]
) -> tuple[list[TrackRecorder], str]:
    """A connected client peer connection (in `peers`) with a silent microphone
    that records what it receives: its recorders and the answer SDP."""
    pc = await make_offer(PcmTrack(np.zeros(RATE, np.int16)))
    peers.append(pc)
    recorders: list[TrackRecorder] = []
    pc.on("track", lambda track: recorders.append(TrackRecorder(track)))
    answer = await negotiate(client, pc)
    await wait_until(lambda: pc.connectionState == "connected" and bool(recorders))
    return recorders, answer


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
        await wait_until(lambda: peer.sending)
        # the track is live before anything is said: silence frames arrive
        await wait_until(lambda: recorders[0].frames >= 5)
        assert not any(recorders[0].pcm)

        await client.send_text("lights please")
        started = await client.wait_for(ReplyAudioStarted, 30)
        done = await client.wait_for(ReplyAudioDone, 30)
        assert started.reply_id == done.reply_id == "r1"
        assert not done.cancelled and done.duration_ms > 2000
        await wait_until(lambda: track.buffered_ms == 0)  # all of it handed to aiortc
        heard = len(recorders[0].pcm)
        await wait_until(lambda: len(recorders[0].pcm) >= heard + 16000)  # and 0.5 s more
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
        await wait_until(lambda: speaking_app.peers[sid].sending)
        await client.send_text("talk")  # about 60 sentences
        await client.wait_for(ReplyAudioStarted, 30)
        await wait_until(lambda: track.audio_frames_sent >= 25)  # half a second heard
        assert track.buffered_ms > 0  # the speaker runs ahead of what is played

        await client.cancel()
        await client.wait_for(ReplyCancelled, 30)
        done = await client.wait_for(ReplyAudioDone, 30)
        assert done.cancelled
        assert track.buffered_ms == 0 and track.cleared_ms > 0
        sent, frames = track.audio_frames_sent, track.frames_sent
        await wait_until(lambda: track.frames_sent >= frames + 25)  # the track goes on...
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


# ---------------------------------------------------------------- memory

SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from voice_agent.config import Config
    from voice_agent.engine.scripted import ScriptedEngine
    from voice_agent.logs import setup_logging
    from voice_agent.server import run

    setup_logging("info", "json")
    config = Config(host="127.0.0.1", port=int(sys.argv[1]))
    run(config, ScriptedEngine(["heard"], token_delay=0.001))
    """
)
WARMUP_CYCLES = 5
CYCLES = 50
MAX_GROWTH_MB = 20


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def webrtc_cycle(url: str, pcm: np.ndarray[Any, Any]) -> None:
    """session.start, offer/answer, speech until speech.started, close the
    WebSocket, then wait for the server to close its side of the peer."""
    client = RealtimeClient(url)
    await client.connect()
    pc = await make_offer(PcmTrack(pcm, speed=4.0))
    try:
        await client.start()
        await negotiate(client, pc)
        await client.wait_for(SpeechStartedEvent, 30)
        await client.close()
        # The server closes its peer connection when the socket ends: its DTLS
        # close reaches the client (without it the client would stay connected).
        await wait_until(lambda: client_dtls_state(pc) == "closed")
    finally:
        await client.close()
        await pc.close()


async def wait_for_server(port: int, proc: subprocess.Popen[bytes]) -> str:
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, "the server exited"
        try:
            async with RealtimeClient(url, open_timeout=2):
                return url
        except OSError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_connect_disconnect_cycles_leave_server_memory_flat(
    audio_dir: Path, tmp_path: Path
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "server.log"
    pcm = speech(audio_dir, RATE)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        url = await wait_for_server(port, proc)
        for _ in range(WARMUP_CYCLES):
            await webrtc_cycle(url, pcm)
        rss_before, fds_before = rss_mb(proc.pid), open_fds(proc.pid)
        for _ in range(CYCLES):
            await webrtc_cycle(url, pcm)
        await asyncio.sleep(0.5)  # the last teardown's stragglers
        rss_after, fds_after = rss_mb(proc.pid), open_fds(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    growth = rss_after - rss_before
    print(f"server RSS {rss_before:.1f} -> {rss_after:.1f} MB over {CYCLES} cycles")
    assert growth < MAX_GROWTH_MB, f"RSS grew {growth:.1f} MB over {CYCLES} cycles"
    assert fds_after <= fds_before + 2  # no UDP socket left behind
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    closed = [r for r in records if r["msg"] == "webrtc closed"]
    assert len(closed) == WARMUP_CYCLES + CYCLES
    assert all(r["frames_received"] > 0 for r in closed)
    assert not [r for r in records if r["level"] in ("error", "critical")]
