"""Text to speech cost on this machine, as JSON.

For each engine (espeak-ng, Piper when installed): load time, time to first
audio after the first sentence of a reply is complete (synthesis of that
sentence plus resampling to 16 kHz, i.e. what TTS adds to the first sound),
and the real-time factor over a whole reply. Voice to voice over WebSocket /
WebRTC is not measured here yet.

    python benchmarks/tts.py [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import time

from voice_agent.tts import load_tts, piper_installed
from voice_agent.tts.speaker import Speech
from voice_agent.tts.split import SentenceSplitter

REPLY = (
    "Sure, I switched on the kitchen light. The living room stays dark, as you asked. "
    "Tomorrow morning will be cloudy with some rain in the afternoon, so take an umbrella "
    "if you go out. Is there anything else I can do for you?"
)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def measure(kind: str, repeats: int) -> dict[str, object]:
    t0 = time.perf_counter()
    tts = load_tts(kind)
    assert tts is not None
    speech = Speech(tts)
    load_ms = (time.perf_counter() - t0) * 1000
    speech.warm_up()
    splitter = SentenceSplitter()
    sentences = splitter.feed(REPLY) + splitter.flush()
    first: list[float] = []
    for _ in range(repeats):
        t = time.perf_counter()
        speech.synthesize_now(sentences[0], 16000)
        first.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    audio_s = sum(len(speech.synthesize_now(s, 16000)) for s in sentences) / 16000
    synth_s = time.perf_counter() - t
    speech.close()
    return {
        "engine": tts.name,
        "load_ms": round(load_ms, 1),
        "first_sentence": sentences[0],
        "first_audio_ms_p50": pct(first, 0.5),
        "first_audio_ms_p99": pct(first, 0.99),
        "reply_audio_s": round(audio_s, 2),
        "real_time_factor": round(synth_s / audio_s, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    kinds = ["espeak"] + (["piper"] if piper_installed() else [])
    results = [measure(k, args.repeats) for k in kinds]
    print(json.dumps({"benchmark": "tts", "repeats": args.repeats, "results": results}, indent=2))


if __name__ == "__main__":
    main()
