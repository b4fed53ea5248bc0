"""Text to speech cost on this machine, on one CPU thread, as JSON.

For each engine (espeak-ng, Piper when installed; Piper's ONNX Runtime on one
intra-op thread, espeak-ng is a single-threaded subprocess):

- load_ms: loading the engine, and warm_up_ms: the start-up synthesis the
  server does so the first reply does not pay for it;
- first_audio: what TTS adds to the first sound of a reply. `speaker`: a
  ReplySpeaker (the server's code path) is shown the reply text as deltas the
  way the model streams it; the time from the delta that completes the first
  piece (split.py's early cut: a clause mark, three words or 18 characters) to the first audio
  frame handed to the transport. `synthesis`: the synthesis and resampling
  of that first piece alone, wall clock and CPU time (`cpu`: the synthesizing
  thread's, plus espeak-ng's own process; on a machine shared with other
  work, CPU time is what the piece costs one idle core). `first_sentence`:
  the same for the whole first sentence, i.e. without the early cut, for
  comparison;
- real_time_factor over the whole reply.

Voice to voice over a real server is benchmarks/voice.py.

    python benchmarks/tts.py [--repeats N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import resource
import sys
import time
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # one CPU thread for everything below

from voice_agent.protocol import ReplyDelta, ReplyDone, ReplyStarted, ServerEvent
from voice_agent.tts import TextToSpeech, piper_installed
from voice_agent.tts.espeak import EspeakTTS
from voice_agent.tts.speaker import ReplySpeaker, Speech
from voice_agent.tts.split import SentenceSplitter

REPLY = (
    "Sure, I switched on the kitchen light. The living room stays dark, as you asked. "
    "Tomorrow morning will be cloudy with some rain in the afternoon, so take an umbrella "
    "if you go out. Is there anything else I can do for you?"
)
# Openings without an early clause mark: the four-word cut decides.
OPENINGS = [
    REPLY,
    "The kitchen light is on now and the living room stays dark.",
    "It will rain tomorrow morning, so take an umbrella with you.",
    "I have set a timer for ten minutes starting right now.",
]
RATE = 16000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def stats(values: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(values, 0.5), "p99_ms": pct(values, 0.99), "min_ms": pct(values, 0.0)}


def cpu_s() -> float:
    """CPU seconds of this thread plus finished child processes (espeak-ng)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.thread_time() + children.ru_utime + children.ru_stime


def timed(speech: Speech, text: str) -> tuple[float, float]:
    """(wall ms, CPU ms) of synthesizing and resampling `text`."""
    wall, cpu = time.perf_counter(), cpu_s()
    speech.synthesize_now(text, RATE)
    return (time.perf_counter() - wall) * 1000, (cpu_s() - cpu) * 1000


def load(kind: str) -> TextToSpeech:
    if kind == "piper":
        from voice_agent.tts.piper import PiperTTS

        return PiperTTS(threads=1)
    return EspeakTTS()


def tokens(text: str) -> list[str]:
    """The text as model-like deltas: one word (with its leading space) each."""
    words = text.split(" ")
    return [words[0]] + [" " + w for w in words[1:]]


async def speaker_first_frame(speech: Speech, text: str) -> float:
    """ms from the delta that completes the first piece to the first audio frame."""
    first_frame: asyncio.Future[float] = asyncio.get_running_loop().create_future()

    async def on_event(event: ServerEvent) -> None:
        pass

    async def on_audio(pcm: bytes) -> None:
        if not first_frame.done():
            first_frame.set_result(time.perf_counter())

    speaker = ReplySpeaker(speech, RATE, on_event, on_audio)
    splitter = SentenceSplitter()
    speaker.observe(ReplyStarted("r1", None))
    complete = 0.0
    for delta in tokens(text):
        pieces = splitter.feed(delta)
        now = time.perf_counter()
        speaker.observe(ReplyDelta("r1", delta))
        if pieces:
            complete = now
            break
    else:
        complete = time.perf_counter()
        speaker.observe(ReplyDone("r1", text, {}, {}))
    ms = (await asyncio.wait_for(first_frame, 60) - complete) * 1000
    await speaker.close()
    return ms


def measure(kind: str, repeats: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    tts = load(kind)
    speech = Speech(tts)
    load_ms = (time.perf_counter() - t0) * 1000
    t0 = time.perf_counter()
    speech.warm_up()
    warm_up_ms = (time.perf_counter() - t0) * 1000
    log(f"{tts.name}: loaded in {load_ms:.0f} ms, warm-up {warm_up_ms:.0f} ms")

    firsts = [(SentenceSplitter().feed(t + " ") or [t])[0] for t in OPENINGS]
    sentences = [(SentenceSplitter(first_words=0).feed(t + " ") or [t])[0] for t in OPENINGS]
    synthesis: list[float] = []
    synthesis_cpu: list[float] = []
    whole: list[float] = []
    whole_cpu: list[float] = []
    speaker: list[float] = []
    for n in range(repeats):
        i = n % len(OPENINGS)
        wall, cpu = timed(speech, firsts[i])
        synthesis.append(wall)
        synthesis_cpu.append(cpu)
        wall, cpu = timed(speech, sentences[i])
        whole.append(wall)
        whole_cpu.append(cpu)
        speaker.append(asyncio.run(speaker_first_frame(speech, OPENINGS[i])))
    log(f"{tts.name}: first audio p50 {pct(speaker, 0.5)} ms after the first piece")

    splitter = SentenceSplitter()
    pieces = splitter.feed(REPLY) + splitter.flush()
    t = time.perf_counter()
    audio_s = sum(len(speech.synthesize_now(p, RATE)) for p in pieces) / RATE
    synth_s = time.perf_counter() - t
    speech.close()
    return {
        "engine": tts.name,
        "threads": 1,
        "load_ms": round(load_ms, 1),
        "warm_up_ms": round(warm_up_ms, 1),
        "first_pieces": firsts,
        "first_audio": {
            "speaker": stats(speaker),
            "synthesis": {**stats(synthesis), "cpu": stats(synthesis_cpu)},
            "first_sentence": {**stats(whole), "cpu": stats(whole_cpu), "pieces": sentences},
        },
        "reply_audio_s": round(audio_s, 2),
        "real_time_factor": round(synth_s / audio_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    kinds = ["espeak"] + (["piper"] if piper_installed() else [])
    results = [measure(k, args.repeats) for k in kinds]
    print(
        json.dumps(
            {
                "benchmark": "tts",
                "repeats": args.repeats,
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "load_avg_1min": round(os.getloadavg()[0], 2),
                "results": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
