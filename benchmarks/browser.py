"""Browser benchmark, per transport (WebRTC, WebSocket PCM):

- page load: navigation start to `session.started` handled in the page
  (`--loads` fresh pages, each a new session);
- mic start: talk-button click to the audio path being up (WebRTC: the
  offer answered; ws: the microphone worklet running);
- reply: `speech.stopped` arriving in the page to the reply's first
  `reply.delta` rendered in the page.

A real headless Chromium (Playwright, /usr/bin/chromium) plays a clip with
silence around it in a loop as its fake microphone, into the real page
(web/, `?bench=1`, which records performance.now() marks in
`window.__voiceAgentMarks`), served by an in-process server on loopback with
the tiny random Qwen2-Audio engine on the CPU. After one warm-up turn, `--turns`
turns are measured per transport. Progress on stderr, one JSON object on stdout.

    python benchmarks/browser.py [--turns 10] [--loads 5] [--transports webrtc,ws]

The tiny model shows the pipeline's overheads (event delivery, rendering), not
real-model speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.config import Config
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.tiny import make_tiny_model
from voice_agent.transports.websocket import running_server

AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
CHROMIUM = "/usr/bin/chromium"
CLIP = "ldc93s1-16k-mono.wav"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def chromium_args(fake_mic: Path) -> list[str]:
    return [
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic}",  # loops: one turn per pass
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-gpu",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        "--autoplay-policy=no-user-gesture-required",
    ]


def latencies(marks: list[dict[str, Any]]) -> list[float]:
    """Per voice turn, in utterance order: first rendered delta minus speech.stopped (ms)."""
    stopped = {m["utterance_id"]: m["t"] for m in marks if m["type"] == "speech.stopped"}
    reply_of = {
        m["reply_id"]: m["utterance_id"]
        for m in marks
        if m["type"] == "reply.started" and m.get("utterance_id")
    }
    out: list[tuple[float, float]] = []
    for m in marks:
        if m["type"] != "reply.delta.first":
            continue
        utt = reply_of.get(m["reply_id"])
        if utt in stopped:
            out.append((stopped[utt], m["t"] - stopped[utt]))
    return [ms for _, ms in sorted(out)]


def summary(samples: list[float]) -> dict[str, Any]:
    a = np.asarray(samples, dtype=np.float64)
    return {
        "n": len(samples),
        "p50_ms": round(float(np.percentile(a, 50)), 2),
        "p99_ms": round(float(np.percentile(a, 99)), 2),
        "mean_ms": round(float(a.mean()), 2),
        "min_ms": round(float(a.min()), 2),
        "max_ms": round(float(a.max()), 2),
    }


def first_mark(marks: list[dict[str, Any]], kind: str) -> float:
    return next(float(m["t"]) for m in marks if m["type"] == kind)


async def run_transport(
    transport: str, url: str, fake_mic: Path, turns: int, loads: int, timeout: float
) -> dict[str, Any]:
    from playwright.async_api import async_playwright

    page_url = f"{url}?bench=1&transport={transport}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_args(fake_mic)
        )
        try:
            load_ms: list[float] = []
            for i in range(loads + 1):  # the first is a warm-up (caches, JIT)
                context = await browser.new_context()  # fresh storage: a new session
                page = await context.new_page()
                await page.goto(page_url)
                await page.wait_for_function(
                    "() => (window.__voiceAgentMarks || []).some((m) => m.type === "
                    "'session.started')",
                    timeout=30_000,
                )
                marks = await page.evaluate("() => window.__voiceAgentMarks")
                if i:
                    load_ms.append(first_mark(marks, "session.started"))
                await context.close()
            log(f"{transport}: {loads} page loads")

            page = await browser.new_page()
            await page.goto(page_url)
            await page.wait_for_selector(
                '[data-testid="connection"][data-state="connected"]', timeout=30_000
            )
            await page.click('[data-testid="talk-button"]')
            await page.wait_for_selector(
                '[data-testid="talk-button"][aria-pressed="true"]', timeout=30_000
            )
            used = await page.inner_text('[data-testid="transport"]')
            marks = await page.evaluate("() => window.__voiceAgentMarks")
            mic_ms = first_mark(marks, "mic.ready") - first_mark(marks, "mic.start")
            log(f"{transport}: mic on, transport in use: {used}")
            want = turns + 1  # the first is a warm-up
            deadline = time.monotonic() + timeout
            got = 0
            marks: list[dict[str, Any]] = []
            while got < want and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                marks = await page.evaluate("() => window.__voiceAgentMarks")
                n = len(latencies(marks))
                if n != got:
                    got = n
                    log(f"{transport}: {got}/{want} turns")
            used = await page.inner_text('[data-testid="transport"]')
            await page.click('[data-testid="talk-button"]')
        finally:
            await browser.close()
    samples = latencies(marks)[1:want]
    if not samples:
        raise RuntimeError(f"{transport}: no voice turn got a rendered reply")
    return {
        "transport_used": used,
        "page_load_to_session_started": {
            **summary(load_ms),
            "samples_ms": [round(s, 1) for s in load_ms],
        },
        "mic_start_ms": round(mic_ms, 1),
        "speech_stopped_to_first_delta": {
            **summary(samples),
            "samples_ms": [round(s, 1) for s in samples],
        },
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        fake_mic = Path(tmp) / "mic-48k.wav"
        subprocess.run(
            [
                *("sox", str(AUDIO / CLIP), "-r", "48000", "-c", "1", "-b", "16", str(fake_mic)),
                *("pad", "0.5", str(args.gap)),
            ],
            check=True,
            capture_output=True,
        )
        log("making the tiny model")
        model_dir = make_tiny_model(Path(tmp) / "tiny")
        engine = Qwen2AudioEngine(str(model_dir), max_new_tokens=args.max_new_tokens)
        engine.load()
        config = Config(host="127.0.0.1", port=0, max_new_tokens=args.max_new_tokens)
        results: dict[str, Any] = {}
        async with running_server(config, engine) as server:
            for transport in args.transports.split(","):
                log(f"{transport}: {args.turns} turns + 1 warm-up")
                results[transport] = await run_transport(
                    transport, server.http_url, fake_mic, args.turns, args.loads, args.timeout
                )
    return {
        "benchmark": "browser page: load -> session.started, click -> mic up, "
        "speech.stopped -> first reply.delta rendered",
        "model": "tiny random Qwen2-Audio (CPU)",
        "max_new_tokens": args.max_new_tokens,
        "clip": CLIP,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "transports": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--loads", type=int, default=5, help="page loads measured per transport")
    ap.add_argument("--transports", default="webrtc,ws")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--gap", type=float, default=1.5, help="silence after the clip, s")
    ap.add_argument("--timeout", type=float, default=180.0, help="per transport, s")
    args = ap.parse_args()
    print(json.dumps(asyncio.run(main_async(args)), indent=2))


if __name__ == "__main__":
    main()
