"""The OpenAI Realtime path of benchmarks/voice.py: the official `openai` SDK
(AsyncOpenAI(base_url=http://127.0.0.1:PORT/v1).realtime.connect) speaks the
same clips to the same server as the native WebSocket client, at real-time
pace, as 24 kHz PCM16 `input_audio_buffer.append` events of 20 ms, with
server VAD at the native hangover. Per turn, on the client's clock:

- voice_to_voice: `input_audio_buffer.speech_stopped` arriving to the first
  `response.output_audio.delta` of the response that answers it;
- end_of_speech_to_audio: from the moment the client sent the last speech
  sample (speech_stopped's audio_end_ms, on the stream's clock) to that first
  delta: what a user waits (hangover included), as the native path measures.

After the first audio the client sends response.cancel and waits for its
response.done, so turns do not overlap (as the native path does).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any

import numpy as np

from voice_agent.audio import float_to_pcm16, resample
from voice_agent.session_defaults import HANGOVER_MS

RATE = 24000
CHUNK_MS = 20
MODEL = "qwen2-audio"


class OpenAIMarks:
    """Arrival times (perf_counter) of the server events the measure needs."""

    def __init__(self) -> None:
        self.stopped: list[tuple[float, str, int]] = []  # (t, item_id, audio_end_ms)
        self.response_of: dict[str, str] = {}  # user item -> response
        self.first_audio: dict[str, float] = {}  # response -> t of its first audio delta
        self.done: set[str] = set()
        self.updated = 0
        self.errors: list[dict[str, Any]] = []
        self._last_item: str | None = None

    def event(self, raw: bytes | str, t: float) -> None:
        event = json.loads(raw)
        kind = event["type"]
        if kind == "input_audio_buffer.speech_stopped":
            self.stopped.append((t, event["item_id"], event["audio_end_ms"]))
        elif kind == "input_audio_buffer.committed":
            self._last_item = event["item_id"]
        elif kind == "response.created" and self._last_item is not None:
            self.response_of.setdefault(self._last_item, event["response"]["id"])
        elif kind == "response.output_audio.delta":
            self.first_audio.setdefault(event["response_id"], t)
        elif kind == "response.done":
            self.done.add(event["response"]["id"])
        elif kind == "session.updated":
            self.updated += 1
        elif kind == "error":
            self.errors.append(event)


def pcm24(pcm16k: bytes) -> bytes:
    """A clip's 16 kHz PCM16 (benchmarks/voice.clip_pcm) as 24 kHz PCM16."""
    audio = np.frombuffer(pcm16k, "<i2").astype(np.float32) / np.float32(32768)
    return float_to_pcm16(resample(audio, 16000, RATE))


async def until(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the turn did not complete in time")
        await asyncio.sleep(0.005)


async def send_paced(conn: Any, pcm: bytes) -> None:
    """Append events of CHUNK_MS, paced at real time by the clock."""
    step = RATE * 2 * CHUNK_MS // 1000
    began = time.monotonic()
    for n, offset in enumerate(range(0, len(pcm), step)):
        chunk = base64.b64encode(pcm[offset : offset + step]).decode("ascii")
        await conn.send({"type": "input_audio_buffer.append", "audio": chunk})
        delay = began + (n + 1) * CHUNK_MS / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def run_openai_turns(
    port: int, clips: list[bytes], turns: int, timeout: float, log: Any
) -> dict[str, list[float]]:
    """`turns` measured turns (plus one warm-up) of the 16 kHz PCM `clips`
    in turn over the OpenAI protocol; the samples of both measures (ms)."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0)
    marks = OpenAIMarks()
    pcms = [pcm24(c) for c in clips]
    out: dict[str, list[float]] = {"voice_to_voice": [], "end_of_speech": []}
    async with client.realtime.connect(model=MODEL) as conn:

        async def pump() -> None:
            while True:
                raw = await conn.recv_bytes()
                marks.event(raw, time.perf_counter())

        reader = asyncio.create_task(pump())
        try:
            vad = {"type": "server_vad", "silence_duration_ms": HANGOVER_MS}
            update: Any = {
                "type": "session.update",
                "session": {
                    "type": "realtime",
                    "output_modalities": ["audio"],
                    "audio": {
                        "input": {
                            "format": {"type": "audio/pcm", "rate": RATE},
                            "turn_detection": vad,
                        },
                        "output": {"format": {"type": "audio/pcm", "rate": RATE}},
                    },
                },
            }
            await conn.send(update)
            await until(lambda: marks.updated or marks.errors, timeout)
            if marks.errors:
                raise RuntimeError(f"session.update refused: {marks.errors}")
            position_ms = 0  # what the turns sent so far (the buffer's clock)
            for turn in range(turns + 1):
                pcm = pcms[turn % len(pcms)]
                seen = len(marks.stopped)
                t_start = time.perf_counter()
                await send_paced(conn, pcm)
                await until(lambda: len(marks.stopped) > seen, timeout)  # noqa: B023
                t_stopped, item, end_ms = marks.stopped[-1]
                await until(lambda: marks.response_of.get(item) in marks.first_audio, timeout)  # noqa: B023
                response = marks.response_of[item]
                t_audio = marks.first_audio[response]
                await conn.send({"type": "response.cancel"})
                await until(lambda: response in marks.done, timeout)  # noqa: B023
                await asyncio.sleep(0.5)  # the cancelled audio drains; the next turn starts clean
                v2v = (t_audio - t_stopped) * 1000
                eos = (t_audio - (t_start + (end_ms - position_ms) / 1000)) * 1000
                position_ms += len(pcm) * 1000 // (2 * RATE)
                log(
                    f"openai turn {turn}: voice to voice {v2v:.0f} ms, "
                    f"end of speech to audio {eos:.0f} ms" + (" (warm-up)" if turn == 0 else "")
                )
                if turn == 0:
                    continue
                out["voice_to_voice"].append(v2v)
                out["end_of_speech"].append(eos)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    return out
