"""Shared by the WebRTC tests (test_webrtc_*.py): a client peer connection
whose microphone plays a recording, offer/answer over the session WebSocket,
servers with and without spoken replies, a recorder of received tracks.
Only loopback addresses are used."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

from tests.helpers.waiting import until
from voice_agent.audio import decode, float_to_pcm16, resample
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import (
    WebRTCAnswer,
)
from voice_agent.transports.webrtc import (
    loopback_candidates,
)
from voice_agent.transports.websocket import WebSocketServerApp, running_server
from voice_agent.tts.espeak import EspeakTTS
from voice_agent.tts.speaker import Speech

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
    await until(lambda: pc.connectionState == "connected" and bool(recorders))
    return recorders, answer
