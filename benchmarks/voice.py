"""Voice to voice: the end of the user's speech to the first sound of the answer.

A real server runs in this process on loopback (the tiny random Qwen2-Audio on
the CPU, or the scripted engine for comparison), speaking its replies with
Piper (one ONNX Runtime thread, warmed up at start as `voice-agent serve`
does) or espeak-ng. A client speaks real recordings from ../shared/audio at
real-time pace, one utterance per turn, and measures on its own clock:

- voice_to_voice: `speech.stopped` arriving to the first reply audio arriving
  (WebSocket: the first binary frame; WebRTC: the first non-silent frame of
  the peer connection's reply track, after Opus and aiortc's jitter buffer);
- voice_to_voice_arrival (WebRTC): the same, up to the arrival of the RTP
  packet that carried that frame. aiortc's receiver holds every audio packet
  until 4 more have come (JitterBuffer prefetch=4: 80 ms of 20 ms frames), a
  fixed delay of this test client; a browser's jitter buffer (NetEq) adapts
  its delay to the jitter it sees instead, so what a browser user waits lies
  between the two figures;
- end_of_speech_to_audio (WebSocket): from the moment the client sent the
  last speech sample (`speech.stopped`'s end_ms) instead, so it includes the
  VAD's silence hangover (600 ms by default): what a user waits;
- tts_added: the `reply.delta` that completes the first piece of the reply
  (tts/split.py's early cut, computed on the client with the same splitter)
  to the first reply audio: what text to speech adds to the first sound.

The `openai` transport is the OpenAI Realtime API (GA) on the same server
through the official `openai` SDK (benchmarks/voice_openai.py): voice_to_voice
from `input_audio_buffer.speech_stopped`, end_of_speech_to_audio as above, both
to the first `response.output_audio.delta`. `ws24` is the native WebSocket
client sending 24 kHz, as OpenAI clients do (the server resamples to 16 kHz):
`openai_minus_ws_ms` and `openai_minus_ws24_ms` compare end_of_speech_to_audio
(p50, p99) of the protocols measured in the same run.

After the first audio of each turn the client cancels the reply and waits
for the audio to stop, so turns do not overlap. One warm-up turn per
engine and transport is not counted. Progress on stderr, JSON on stdout.

    python benchmarks/voice.py [--turns 10] [--engines tiny,scripted]
        [--transports ws,ws24,webrtc,openai] [--tts piper|espeak] > docs/benchmarks/voice.json
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.audio import decode, float_to_pcm16, resample
from voice_agent.client import FRAME_MS, PcmAudio, RealtimeClient, send_paced
from voice_agent.config import Config
from voice_agent.engine.base import Engine
from voice_agent.protocol import (
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SpeechStoppedEvent,
    WebRTCAnswer,
)
from voice_agent.transports.websocket import WebSocketServerApp, running_server
from voice_agent.tts import piper_installed
from voice_agent.tts.speaker import Speech
from voice_agent.tts.split import SentenceSplitter

AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
CLIPS = ["ldc93s1-16k-mono.wav", "new-home-in-the-stars-16k.wav"]
SCRIPTED_REPLY = "Sure, the kitchen light is on now. Anything else I can do for you?"
SILENCE_AFTER_S = 1.0  # after each clip: the 600 ms hangover closes the utterance
TURN_TIMEOUT_S = 60.0
WEBRTC_RATE = 48000
AUDIBLE = 300  # a received WebRTC sample above this is reply audio, not silence


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def summary(samples: list[float]) -> dict[str, Any]:
    if not samples:
        return {"n": 0}
    a = np.asarray(samples, dtype=np.float64)
    return {
        "n": len(samples),
        "p50_ms": round(float(np.percentile(a, 50)), 1),
        "p99_ms": round(float(np.percentile(a, 99)), 1),
        "mean_ms": round(float(a.mean()), 1),
        "min_ms": round(float(a.min()), 1),
        "max_ms": round(float(a.max()), 1),
        "samples_ms": [round(s, 1) for s in samples],
    }


class Marks:
    """Arrival times (perf_counter) of what the measurement needs."""

    def __init__(self) -> None:
        self.stopped: dict[str, tuple[float, int]] = {}  # utterance -> (t, end_ms)
        self.reply_of: dict[str, str] = {}  # utterance -> reply
        self.first_piece: dict[str, float] = {}  # reply -> t of the completing delta
        self.audio_started: dict[str, float] = {}
        self.audio_done: set[str] = set()
        self.first_audio: dict[str, float] = {}  # reply -> t of the first audio
        self.first_arrival: dict[str, float] = {}  # WebRTC: its RTP packet arrived
        self.speaking: str | None = None  # reply between audio started and done
        self._splitters: dict[str, SentenceSplitter] = {}

    def event(self, event: ServerEvent) -> None:
        t = time.perf_counter()
        if isinstance(event, SpeechStoppedEvent):
            self.stopped[event.utterance_id] = (t, event.end_ms)
        elif isinstance(event, ReplyStarted):
            if event.utterance_id:
                self.reply_of[event.utterance_id] = event.reply_id
            self._splitters[event.reply_id] = SentenceSplitter()
        elif isinstance(event, ReplyDelta | ReplyDone):
            splitter = self._splitters.get(event.reply_id)
            if splitter is not None and event.reply_id not in self.first_piece:
                pieces = (
                    splitter.feed(event.text) if isinstance(event, ReplyDelta) else splitter.flush()
                )
                if pieces:
                    self.first_piece[event.reply_id] = t
        elif isinstance(event, ReplyAudioStarted):
            self.audio_started[event.reply_id] = t
            self.speaking = event.reply_id
        elif isinstance(event, ReplyAudioDone):
            self.audio_done.add(event.reply_id)
            if self.speaking == event.reply_id:
                self.speaking = None

    def audio(self, t: float | None = None, arrived: float | None = None) -> None:
        """Reply audio arrived (a binary frame, or an audible track frame and
        when its RTP packet arrived)."""
        reply = self.speaking
        if reply is not None and reply not in self.first_audio:
            self.first_audio[reply] = time.perf_counter() if t is None else t
            if arrived is not None:
                self.first_arrival[reply] = arrived


async def until(check: Any, timeout: float = TURN_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the turn did not complete in time")
        await asyncio.sleep(0.005)


# --------------------------------------------------------------- WebRTC client


def webrtc_parts() -> Any:
    """aiortc pieces, imported only for --transports webrtc."""
    import av
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

    from voice_agent.transports.webrtc import loopback_candidates

    class MicTrack(AudioStreamTrack):  # type: ignore[misc]
        """48 kHz mono: the queued PCM at real time, silence otherwise."""

        def __init__(self) -> None:
            super().__init__()
            self.pcm = np.zeros(0, np.int16)
            self.frames = 0
            self._t0: float | None = None

        def play(self, pcm: np.ndarray) -> None:
            self.pcm = np.concatenate([self.pcm, pcm])

        @property
        def idle(self) -> bool:
            return len(self.pcm) == 0

        async def recv(self) -> Any:
            if self.readyState != "live":
                raise MediaStreamError
            n = WEBRTC_RATE * FRAME_MS // 1000
            if self._t0 is None:
                self._t0 = time.monotonic()
            wait = self._t0 + self.frames * FRAME_MS / 1000 - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            chunk, self.pcm = self.pcm[:n], self.pcm[n:]
            if len(chunk) < n:
                chunk = np.concatenate([chunk, np.zeros(n - len(chunk), np.int16)])
            frame = av.AudioFrame.from_ndarray(chunk.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate = WEBRTC_RATE
            frame.pts = self.frames * n
            frame.time_base = fractions.Fraction(1, WEBRTC_RATE)
            self.frames += 1
            return frame

    return (
        MicTrack,
        RTCPeerConnection,
        RTCConfiguration,
        RTCSessionDescription,
        MediaStreamError,
        loopback_candidates,
    )


def watch_arrivals(pc: Any) -> dict[int, float]:
    """Arrival times (perf_counter) of the RTP packets of the reply track, by
    timestamp rebased to the first packet as aiortc's receiver does for the
    pts of the frames it decodes (so a decoded frame finds its packet). Wraps
    the receiver's private `_handle_rtp_packet`: a measurement hook only."""
    receiver = next(t.receiver for t in pc.getTransceivers() if t.kind == "audio")
    handle = receiver._handle_rtp_packet
    arrivals: dict[int, float] = {}  # insertion-ordered: the oldest go first
    origin: list[int] = []

    async def on_rtp(packet: Any, arrival_time_ms: int) -> None:
        if not origin:
            origin.append(packet.timestamp)
        arrivals.setdefault((packet.timestamp - origin[0]) % 2**32, time.perf_counter())
        while len(arrivals) > 256:  # bounded: about 5 s of 20 ms packets
            del arrivals[next(iter(arrivals))]
        await handle(packet, arrival_time_ms)

    receiver._handle_rtp_packet = on_rtp
    return arrivals


# ------------------------------------------------------------------- the turns


def clip_pcm(name: str) -> bytes:
    audio = decode(AUDIO / name)  # 16 kHz mono float32
    return float_to_pcm16(np.concatenate([audio, np.zeros(int(SILENCE_AFTER_S * 16000))]))


async def one_turn(
    client: RealtimeClient, marks: Marks, pcm: bytes, mic: Any, rate: int = 16000
) -> tuple[str, str]:
    """Speak `pcm`; wait for the first reply audio, cancel, wait for quiet.
    (utterance id, reply id)."""
    seen = set(marks.stopped)
    if mic is not None:
        samples = np.frombuffer(pcm, "<i2").astype(np.float32) / np.float32(32768)
        mic.play(np.frombuffer(float_to_pcm16(resample(samples, 16000, WEBRTC_RATE)), np.int16))
    else:
        await send_paced(client, PcmAudio(pcm, rate), pcm, 1.0)
    await until(lambda: set(marks.stopped) - seen)
    utterance = max(set(marks.stopped) - seen, key=lambda u: marks.stopped[u][0])
    await until(lambda: marks.reply_of.get(utterance) in marks.first_audio)
    reply = marks.reply_of[utterance]
    await client.cancel()
    await until(lambda: reply in marks.audio_done)
    if mic is not None:
        await until(lambda: mic.idle)
    await asyncio.sleep(0.5)  # the cancelled audio drains; the next turn starts clean
    return utterance, reply


async def run_turns(app: WebSocketServerApp, transport: str, turns: int) -> dict[str, list[float]]:
    marks = Marks()
    rate = 24000 if transport == "ws24" else 16000  # ws24: what the OpenAI path sends
    pcms = [at_rate(clip_pcm(name), rate) for name in CLIPS]
    out: dict[str, list[float]] = {
        "voice_to_voice": [],
        "arrival": [],
        "end_of_speech": [],
        "tts_added": [],
    }
    on_audio = (lambda pcm: marks.audio()) if transport in ("ws", "ws24") else None
    async with RealtimeClient(app.url, on_event=marks.event, on_audio=on_audio) as client:
        session = await client.start(rate, 1)
        pc = mic = recorder = None
        if transport == "webrtc":
            pc, mic, recorder = await connect_webrtc(app, client, session.session_id, marks)
        position_ms = 0  # session stream position (WebSocket: only what the turns sent)
        try:
            for turn in range(turns + 1):
                pcm = pcms[turn % len(pcms)]
                t_start = time.perf_counter()
                utterance, reply = await one_turn(client, marks, pcm, mic, rate)
                t_stopped, end_ms = marks.stopped[utterance]
                t_audio = marks.first_audio[reply]
                v2v = (t_audio - t_stopped) * 1000
                tts = (t_audio - marks.first_piece.get(reply, t_audio)) * 1000
                t_arrival = marks.first_arrival.get(reply)
                arrival = None if t_arrival is None else (t_arrival - t_stopped) * 1000
                log(
                    f"{transport} turn {turn}: voice to voice {v2v:.0f} ms, TTS {tts:.0f} ms"
                    + ("" if arrival is None else f", packet arrived at {arrival:.0f} ms")
                    + (" (warm-up)" if turn == 0 else "")
                )
                end_of_speech = t_start + (end_ms - position_ms) / 1000  # WebSocket only
                position_ms += len(pcm) * 1000 // (2 * rate)
                if turn == 0:
                    continue
                out["voice_to_voice"].append(v2v)
                out["tts_added"].append(tts)
                if arrival is not None:
                    out["arrival"].append(arrival)
                if transport in ("ws", "ws24"):
                    out["end_of_speech"].append((t_audio - end_of_speech) * 1000)
        finally:
            if recorder is not None:
                recorder.cancel()
                await asyncio.gather(recorder, return_exceptions=True)
            if pc is not None:
                await pc.close()
    return out


async def connect_webrtc(
    app: WebSocketServerApp, client: RealtimeClient, session_id: str, marks: Marks
) -> tuple[Any, Any, asyncio.Task[None]]:
    (
        MicTrack,
        RTCPeerConnection,
        RTCConfiguration,
        RTCSessionDescription,
        MediaStreamError,
        loopback_candidates,
    ) = webrtc_parts()
    mic = MicTrack()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTrack(mic)
    tracks: list[Any] = []
    pc.on("track", tracks.append)
    with loopback_candidates():
        await pc.setLocalDescription(await pc.createOffer())
    await client.send_json({"type": "webrtc.offer", "sdp": pc.localDescription.sdp})
    answer = await client.wait_for(WebRTCAnswer, 30)
    await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.sdp, type="answer"))
    arrivals = watch_arrivals(pc)  # before the first RTP packet can come
    peer = app.peers[session_id]
    await until(lambda: pc.connectionState == "connected" and tracks and peer.sending, 30)

    async def record(track: Any) -> None:
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                return
            if np.abs(frame.to_ndarray()).max() > AUDIBLE:
                marks.audio(arrived=arrivals.get(frame.pts % 2**32))

    return pc, mic, asyncio.create_task(record(tracks[0]))


# ------------------------------------------------------------------ set-up


def make_engine(kind: str, tmp: Path, max_new_tokens: int) -> Engine:
    if kind == "scripted":
        from voice_agent.engine.scripted import ScriptedEngine

        return ScriptedEngine([SCRIPTED_REPLY], token_delay=0.01)  # about 100 tokens/s
    from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
    from voice_agent.engine.tiny import make_tiny_model

    engine = Qwen2AudioEngine(str(make_tiny_model(tmp / "tiny")), max_new_tokens=max_new_tokens)
    engine.load()
    return engine


def make_speech(kind: str) -> Speech:
    if kind == "piper":
        from voice_agent.tts.piper import PiperTTS

        speech = Speech(PiperTTS(threads=1))
    else:
        from voice_agent.tts.espeak import EspeakTTS

        speech = Speech(EspeakTTS())
    speech.warm_up()  # as voice-agent serve does at start
    return speech


async def openai_results(app: WebSocketServerApp, turns: int) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script
    from benchmarks.voice_openai import run_openai_turns

    clips = [clip_pcm(name) for name in CLIPS]
    got = await run_openai_turns(app.port, clips, turns, TURN_TIMEOUT_S, log)
    return {
        "voice_to_voice": summary(got["voice_to_voice"]),
        "end_of_speech_to_audio": summary(got["end_of_speech"]),
    }


def at_rate(pcm: bytes, rate: int) -> bytes:
    """16 kHz PCM16 at `rate`."""
    if rate == 16000:
        return pcm
    samples = np.frombuffer(pcm, "<i2").astype(np.float32) / np.float32(32768)
    return float_to_pcm16(resample(samples, 16000, rate))


def compare(by_transport: dict[str, Any]) -> None:
    """openai_minus_ws_ms / openai_minus_ws24_ms: what the OpenAI protocol
    adds to the native one at 16 kHz / at the same 24 kHz input (end of speech
    to the first audio, p50 and p99, same server, same run)."""
    oa = by_transport.get("openai", {}).get("end_of_speech_to_audio", {})
    for native in ("ws", "ws24"):
        ws = by_transport.get(native, {}).get("end_of_speech_to_audio", {})
        if ws.get("n") and oa.get("n"):
            by_transport[f"openai_minus_{native}_ms"] = {
                q: round(oa[f"{q}_ms"] - ws[f"{q}_ms"], 1) for q in ("p50", "p99")
            }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    torch.set_num_threads(args.threads)
    speech = make_speech(args.tts)
    results: dict[str, Any] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for kind in args.engines.split(","):
                log(f"{kind}: loading")
                engine = make_engine(kind, Path(tmp), args.max_new_tokens)
                config = Config(
                    host="127.0.0.1", port=0, db="none", max_new_tokens=args.max_new_tokens
                )
                results[kind] = {}
                async with running_server(config, engine, speech=speech) as app:
                    for transport in args.transports.split(","):
                        if transport == "openai":
                            results[kind][transport] = await openai_results(app, args.turns)
                            continue
                        if transport == "webrtc" and app.webrtc is None:
                            log("webrtc: aiortc is missing, skipped")
                            continue
                        got = await run_turns(app, transport, args.turns)
                        results[kind][transport] = {
                            "voice_to_voice": summary(got["voice_to_voice"]),
                            **(
                                {"voice_to_voice_arrival": summary(got["arrival"])}
                                if got["arrival"]
                                else {}
                            ),
                            "tts_added": summary(got["tts_added"]),
                            **(
                                {"end_of_speech_to_audio": summary(got["end_of_speech"])}
                                if got["end_of_speech"]
                                else {}
                            ),
                        }
                compare(results[kind])
    finally:
        speech.close()
    return {
        "benchmark": "voice to voice: speech.stopped -> first reply audio at the client",
        "tts": speech.name,
        "tts_threads": 1,
        "torch_threads": args.threads,
        "max_new_tokens": args.max_new_tokens,
        "clips": CLIPS,
        "turns": args.turns,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 2),
        "engines": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=10, help="measured turns (plus one warm-up)")
    ap.add_argument("--engines", default="tiny,scripted")
    ap.add_argument("--transports", default="ws,ws24,webrtc,openai")
    ap.add_argument("--tts", default="piper" if piper_installed() else "espeak")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
