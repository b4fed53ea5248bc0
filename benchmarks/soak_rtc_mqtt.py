"""The soak's WebRTC and MQTT clients (benchmarks/soak.py).

WebRTC: what a browser does, with aiortc: a started WebSocket session, an
offer with an Opus track that plays recordings at 48 kHz in real time
(silence in between), the reply's audio pulled from the server's track; two
or three recordings per peer connection, then both close and it starts again.

MQTT: one asker client (a persistent session, QoS 1, reconnecting when the
broker goes away) for several devices, each asking by text on
PREFIX/DEVICE/ask and waiting for PREFIX/DEVICE/reply (or /error)."""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import json
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import aiomqtt
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, MediaStreamTrack

from benchmarks.soak_clients import TEXTS, Context, Tracker, finish, open_session
from voice_agent.audio import float_to_pcm16, resample
from voice_agent.protocol import WebRTCAnswer
from voice_agent.transports.webrtc import loopback_candidates

RATE = 48000
FRAME = RATE // 50
PREFIX = "voice_agent"


def to_48k(pcm16k: bytes) -> np.ndarray[Any, Any]:
    audio = np.frombuffer(pcm16k, np.int16).astype(np.float32) / 32768.0
    return np.frombuffer(float_to_pcm16(resample(audio, 16000, RATE)), np.int16)


class QueueTrack(AudioStreamTrack):
    """A microphone track: queued speech at real-time pace, else silence."""

    def __init__(self) -> None:
        super().__init__()
        self.frames: deque[np.ndarray[Any, Any]] = deque()
        self.sent = 0
        self.t0: float | None = None

    def say(self, pcm: np.ndarray[Any, Any]) -> float:
        for i in range(0, len(pcm) - FRAME + 1, FRAME):
            self.frames.append(pcm[i : i + FRAME])
        return len(self.frames) * 0.02

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        if self.t0 is None:
            self.t0 = time.monotonic()
        wait = self.t0 + self.sent * 0.02 - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        elif wait < -1.0:  # this process fell behind: no burst
            self.t0, self.sent = time.monotonic(), 0
        chunk = self.frames.popleft() if self.frames else np.zeros(FRAME, np.int16)
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = self.sent * FRAME
        frame.time_base = fractions.Fraction(1, RATE)
        self.sent += 1
        return frame


async def _drain(track: MediaStreamTrack) -> None:
    with contextlib.suppress(MediaStreamError, asyncio.CancelledError):
        while True:
            await track.recv()


def _drainer(tasks: list[asyncio.Task[None]]) -> Callable[[MediaStreamTrack], None]:
    """The peer connection's `track` handler: the server's audio is pulled and dropped."""

    def on_track(track: MediaStreamTrack) -> None:
        tasks.append(asyncio.create_task(_drain(track)))

    return on_track


async def webrtc_client(ctx: Context, name: str) -> None:
    recordings = [to_48k(r) for r in ctx.recordings]
    while not ctx.stopping.is_set():
        tracker = Tracker(ctx.ledger, "webrtc", name)
        try:
            client, _ = await open_session(ctx, tracker)
        except Exception as exc:
            ctx.ledger.notes[f"webrtc connect failed: {type(exc).__name__}"] += 1
            await ctx.pause(2, 4)
            continue
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        mic = QueueTrack()
        pc.addTrack(mic)
        drains: list[asyncio.Task[None]] = []
        pc.on("track", _drainer(drains))
        try:
            with loopback_candidates():
                await pc.setLocalDescription(await pc.createOffer())
            assert pc.localDescription is not None
            await client.send_json({"type": "webrtc.offer", "sdp": pc.localDescription.sdp})
            answer = await client.wait_for(WebRTCAnswer, 30)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
            for _ in range(ctx.rng.randint(2, 3)):
                if ctx.stopping.is_set() or client.ended:
                    break
                before, spoke_at = tracker.stopped, ctx.ledger.now()
                await asyncio.sleep(mic.say(ctx.rng.choice(recordings)))
                heard = await tracker.wait(tracker.stopped_since(before), 15, client)
                if not heard and not client.ended:
                    lost = ctx.ledger.begin("webrtc", name, spoke_at)
                    ctx.ledger.end(lost, "no_speech_stopped")
                await asyncio.sleep(1.0)
                if not await tracker.wait(tracker.idle, ctx.turn_timeout, client):
                    tracker.fail_all("timeout")
                    break
                await ctx.think()
        except Exception as exc:
            ctx.ledger.notes[f"webrtc failed: {type(exc).__name__}: {exc}"[:120]] += 1
        finally:
            await finish(ctx, client, tracker, "webrtc")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(pc.close(), 10)
            for task in drains:
                task.cancel()
            await asyncio.gather(*drains, return_exceptions=True)
        await ctx.pause(0.5, 2)


class MqttAsker:
    """One MQTT client for the soak's devices; replies matched by request id."""

    def __init__(self, ctx: Context, url: str) -> None:
        self.ctx = ctx
        host, port = url.removeprefix("mqtt://").rsplit(":", 1)
        self.host, self.port = host, int(port)
        self.client: aiomqtt.Client | None = None
        self.connected = asyncio.Event()
        self.pending: dict[str, asyncio.Future[str]] = {}

    async def run(self) -> None:
        while not self.ctx.stopping.is_set():
            try:
                async with aiomqtt.Client(
                    self.host, self.port, identifier="soak-asker", clean_session=False
                ) as client:
                    await client.subscribe([(f"{PREFIX}/+/reply", 1), (f"{PREFIX}/+/error", 1)])
                    self.client = client
                    self.connected.set()
                    async for message in client.messages:
                        self._on(str(message.topic), bytes(message.payload))  # type: ignore[arg-type]
            except aiomqtt.MqttError:
                self.ctx.ledger.notes["mqtt asker disconnected"] += 1
            finally:
                self.connected.clear()
                self.client = None
            await self.ctx.pause(0.5, 1)

    def _on(self, topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            return
        fut = self.pending.get(str(body.get("id")))
        if fut is None or fut.done():
            return
        if topic.endswith("/reply"):
            fut.set_result("answered")
        elif topic.endswith("/error"):
            fut.set_result(f"error:{body.get('code')}")

    async def device(self, name: str) -> None:
        ledger, n = self.ctx.ledger, 0
        while not self.ctx.stopping.is_set():
            try:
                await asyncio.wait_for(self.connected.wait(), 30)
            except TimeoutError:
                ledger.notes["mqtt broker unreachable for 30 s"] += 1
                continue
            client = self.client
            if client is None:
                continue
            n += 1
            rid = f"{name}-{n}"
            fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
            self.pending[rid] = fut
            turn = ledger.begin("mqtt", name)
            body = json.dumps({"id": rid, "text": self.ctx.rng.choice(TEXTS)})
            try:
                await client.publish(f"{PREFIX}/{name}/ask", body, qos=1)
                outcome = await asyncio.wait_for(fut, self.ctx.turn_timeout)
            except aiomqtt.MqttError:
                outcome = "error:publish_failed"
            except TimeoutError:
                outcome = "timeout"
            finally:
                self.pending.pop(rid, None)
            ledger.end(turn, outcome)
            await self.ctx.think()
