"""WebRTC benchmark; prints one JSON object on stdout, progress on stderr.

    .venv/bin/python benchmarks/webrtc.py [--cycles 50] [--speed 1]

A real server (ScriptedEngine, so only the transport is measured) runs in a
subprocess on a free loopback port. Each cycle is what a browser does: open
the WebSocket, session.start, a WebRTC offer (aiortc client, loopback
candidates, an Opus track playing ../shared/audio/ldc93s1-16k-mono.wav at
48 kHz, `--speed` times real time), apply the answer, wait for speech.started,
close the WebSocket and wait for the server to close its side (its DTLS close
reaches the client).

Reported:
- rss_mb: the server's RSS after each cycle, and its growth after a warm-up
  of 5 cycles (the leak check: tests/transports/test_webrtc.py asserts < 20 MB
  over 50 cycles);
- offer_to_answer_ms: offer sent -> webrtc.answer received (the server's
  setRemoteDescription, ICE gathering on loopback, createAnswer);
- answer_to_media_ms: answer applied -> the first audio frame pulled by the
  client's sender (ICE checks + DTLS handshake);
- answer_to_speech_started_ms: answer applied -> speech.started; includes the
  clip's own lead-in and the VAD's 200 ms minimum speech, so compare runs, not
  absolute values;
- speech_started_lag_ms: speech.started minus the moment the client sent the
  audio position `start_ms + min_speech_ms` (at --speed 1 only): what WebRTC
  and the VAD add, approximately;
- teardown_ms: WebSocket closed -> the client saw the server's DTLS close.
p50/p90/max over the cycles.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from voice_agent.audio import decode, float_to_pcm16, resample  # noqa: E402
from voice_agent.client import RealtimeClient  # noqa: E402
from voice_agent.protocol import SpeechStartedEvent, WebRTCAnswer  # noqa: E402
from voice_agent.transports.webrtc import loopback_candidates  # noqa: E402

AUDIO = (ROOT / "../shared/audio/ldc93s1-16k-mono.wav").resolve()
RATE = 48000
FRAME = RATE // 50
MIN_SPEECH_MS = 200  # the server's default --min-speech-ms
WARMUP = 5

SERVER_SCRIPT = textwrap.dedent(
    """
    import sys
    from voice_agent.config import Config
    from voice_agent.engine.scripted import ScriptedEngine
    from voice_agent.logs import setup_logging
    from voice_agent.server import run

    setup_logging("warning", "text")
    run(Config(host="127.0.0.1", port=int(sys.argv[1])), ScriptedEngine(["ok"]))
    """
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PcmTrack(AudioStreamTrack):
    """int16 mono PCM at 48 kHz in 20 ms frames, paced at `speed` x real time."""

    def __init__(self, pcm: np.ndarray[Any, Any], speed: float) -> None:
        super().__init__()
        self.pcm = pcm
        self.speed = speed
        self.sent = 0
        self.t0: float | None = None

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        pts = self.sent * FRAME
        if self.t0 is None:
            self.t0 = time.monotonic()
        elif self.speed > 0:
            wait = self.t0 + pts / RATE / self.speed - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
        chunk = self.pcm[pts : pts + FRAME]
        if len(chunk) < FRAME:
            chunk = np.concatenate([chunk, np.zeros(FRAME - len(chunk), np.int16)])
        frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, RATE)
        self.sent += 1
        return frame


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def cycle(url: str, pcm: np.ndarray[Any, Any], speed: float) -> dict[str, float]:
    client = RealtimeClient(url)
    await client.connect()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = PcmTrack(pcm, speed)
    pc.addTrack(track)
    try:
        await client.start()
        with loopback_candidates():
            await pc.setLocalDescription(await pc.createOffer())
        assert pc.localDescription is not None
        t_offer = time.monotonic()
        await client.send_json({"type": "webrtc.offer", "sdp": pc.localDescription.sdp})
        answer = await client.wait_for(WebRTCAnswer, 30)
        t_answer = time.monotonic()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
        started = await client.wait_for(SpeechStartedEvent, 30)
        t_speech = time.monotonic()
        out = {
            "offer_to_answer_ms": (t_answer - t_offer) * 1000,
            "answer_to_media_ms": ((track.t0 or t_speech) - t_answer) * 1000,
            "answer_to_speech_started_ms": (t_speech - t_answer) * 1000,
        }
        if speed == 1 and track.t0 is not None:
            heard_at = track.t0 + (started.start_ms + MIN_SPEECH_MS) / 1000
            out["speech_started_lag_ms"] = (t_speech - heard_at) * 1000
        await client.close()
        t_closed = time.monotonic()
        dtls = pc.getTransceivers()[0].receiver.transport
        while dtls.state != "closed":
            if time.monotonic() - t_closed > 10:
                raise RuntimeError("the server did not close its peer connection")
            await asyncio.sleep(0.005)
        out["teardown_ms"] = (time.monotonic() - t_closed) * 1000
        return out
    finally:
        await client.close()
        await pc.close()


def summary(values: list[float]) -> dict[str, float]:
    a = np.array(values)
    return {
        "p50": round(float(np.percentile(a, 50)), 1),
        "p90": round(float(np.percentile(a, 90)), 1),
        "max": round(float(a.max()), 1),
    }


async def main(cycles: int, speed: float) -> dict[str, Any]:
    clip = decode(AUDIO)
    pcm = np.frombuffer(float_to_pcm16(resample(clip, 16000, RATE)), np.int16)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER_SCRIPT, str(port)], cwd=ROOT, stdout=subprocess.DEVNULL
    )
    url = f"ws://127.0.0.1:{port}/v1/realtime"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                async with RealtimeClient(url, open_timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)
        rss_start = rss_mb(proc.pid)
        log(f"server up, RSS {rss_start:.1f} MB; {WARMUP} warm-up + {cycles} cycles")
        for _ in range(WARMUP):
            await cycle(url, pcm, speed)
        rss_warm = rss_mb(proc.pid)
        results: list[dict[str, float]] = []
        rss: list[float] = []
        t0 = time.monotonic()
        for i in range(cycles):
            results.append(await cycle(url, pcm, speed))
            rss.append(round(rss_mb(proc.pid), 2))
            if (i + 1) % 10 == 0:
                log(f"cycle {i + 1}/{cycles}: RSS {rss[-1]:.1f} MB")
        wall = time.monotonic() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    keys = results[0].keys() if results else []
    return {
        "cycles": cycles,
        "speed": speed,
        "seconds_per_cycle": round(wall / max(cycles, 1), 3),
        "rss_mb": {
            "start": round(rss_start, 1),
            "after_warmup": round(rss_warm, 1),
            "end": rss[-1] if rss else None,
            "growth_after_warmup": round(rss[-1] - rss_warm, 1) if rss else None,
            "per_cycle": rss,
        },
        **{k: summary([r[k] for r in results if k in r]) for k in keys},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=50)
    parser.add_argument("--speed", type=float, default=1.0, help="x real time (0: no pacing)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.cycles, args.speed)), indent=2))
