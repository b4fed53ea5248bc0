"""Soak: mixed load and faults for `--minutes` against `voice-agent serve`.

    .venv/bin/python benchmarks/soak.py [--minutes 20] [--mix speech=8,text=8,...]
        [--faults engine,mosquitto,postgres] [--max-new-tokens 48]

Loopback only; bounded in time; stops by itself. It starts a PostgreSQL
server and a mosquitto broker (benchmarks/soak_services.py) and `voice-agent
serve` on the tiny random Qwen2-Audio (written to a temporary directory) with
`--engine-process`, `--db postgresql://...` and `--mqtt`, default settings
otherwise (spoken replies: TTS auto) apart from `--max-new-tokens` and the
connection limits raised for one loopback address. Then a mix of clients runs
at once (benchmarks/soak_clients.py, soak_rtc_mqtt.py), by default 32:
speech (recordings from ../shared/audio streamed at real time), text (typed
turns), resume (typed turns; every few turns the connection closes or drops
and the next one resumes the conversation by session_id), webrtc (aiortc,
Opus), mqtt (devices asking on PREFIX/DEVICE/ask), vanish (drop the
connection once the reply has begun, then resume), never_read (a spoken
session that never reads a byte). Faults on a schedule between the warm-up
and 80 % of the run, in turn: the engine worker process killed (SIGKILL),
mosquitto restarted, PostgreSQL restarted (`pg_ctl restart -m fast`).

Every `--sample-s` seconds it reads the RSS and open file descriptors of the
server process and of its engine worker process (separately, from /proc);
growth is measured from the first sample after the warm-up. At the end the
clients finish the turn in hand and close, and after a pause the idle server
is sampled once more. One JSON object on stdout (benchmarks/soak_ledger.py
says how turns are counted), progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.soak_clients import (  # noqa: E402
    Context,
    never_reading_client,
    speech_client,
    typed_client,
    vanishing_client,
)
from benchmarks.soak_ledger import Ledger  # noqa: E402
from benchmarks.soak_rtc_mqtt import MqttAsker, webrtc_client  # noqa: E402
from benchmarks.soak_series import log_summary, series_growth, worker_growth  # noqa: E402
from benchmarks.soak_services import (  # noqa: E402
    Mosquitto,
    Postgres,
    Server,
    log,
    open_fds,
    rss_mb,
)
from voice_agent.client import load_pcm  # noqa: E402

AUDIO_DIR = (ROOT / "../shared/audio").resolve()
RECORDINGS = [
    "jfk.wav",
    "librispeech-1272-128104-0000.flac",
    "ldc93s1-16k-mono.wav",
    "new-home-in-the-stars-16k.wav",
]
DEFAULT_MIX = "speech=8,text=8,resume=4,webrtc=2,mqtt=4,vanish=3,never_read=3"
FAULT_KINDS = ("engine", "mosquitto", "postgres")
GOAL_RSS_MB = 50.0


def parse_mix(text: str) -> dict[str, int]:
    mix = {k: int(v) for k, v in (item.split("=") for item in text.split(",") if item)}
    known = {"speech", "text", "resume", "webrtc", "mqtt", "vanish", "never_read"}
    if not set(mix) <= known:
        raise SystemExit(f"unknown client kinds: {sorted(set(mix) - known)}")
    return mix


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.duration = args.minutes * 60
        self.warmup = args.warmup_s if args.warmup_s is not None else self._auto_warmup()
        self.ledger = Ledger()
        self.samples: list[dict[str, Any]] = []
        self.mosquitto = Mosquitto(tmp)
        self.postgres = Postgres()
        self.server: Server | None = None
        self.draining = False

    def _auto_warmup(self) -> float:
        return float(min(180.0, max(3.0, 0.15 * self.duration)))

    def sample(self, phase: str, kept_mb: float | None = None) -> dict[str, Any]:
        assert self.server is not None
        worker = self.server.worker_pid()
        row = {
            "server_kept_mb": kept_mb,  # ended conversations kept for resuming (/metrics)
            "t_s": round(self.ledger.now(), 1),
            "phase": phase,
            "server_rss_mb": rss_mb(self.server.pid),
            "server_fds": open_fds(self.server.pid),
            "worker_rss_mb": rss_mb(worker),
            "worker_fds": open_fds(worker),
            "worker_pid": worker,
            "load_avg_1m": round(os.getloadavg()[0], 2),  # the machine, other work included
        }
        self.samples.append(row)
        return row

    async def kept_mb(self) -> float | None:
        """The server's voice_agent_kept_conversation_bytes (MB), from /metrics."""
        assert self.server is not None
        kept = await asyncio.to_thread(self.server.metric, "voice_agent_kept_conversation_bytes")
        return None if kept is None else round(kept / 1e6, 1)

    def start_trace(self) -> bool:
        """With --trace: tracemalloc starts in the server (True once asked)."""
        if self.server is not None and self.server.trace is not None:
            Path(f"{self.server.trace}.start").touch()
        return True

    async def sampler(self, stopping: asyncio.Event) -> None:
        last_log = 0.0
        traced = False
        while not stopping.is_set():
            t = self.ledger.now()
            phase = "drain" if self.draining else "warmup" if t < self.warmup else "load"
            if phase == "load" and not traced:
                traced = self.start_trace()  # objects made from now on
            row = self.sample(phase, await self.kept_mb())
            if t - last_log >= self.args.progress_s:
                last_log = t
                s = self.ledger.summary()
                log(
                    f"t={t:.0f}s rss server {row['server_rss_mb']} MB worker "
                    f"{row['worker_rss_mb']} MB (kept {row['server_kept_mb']} MB), "
                    f"fds {row['server_fds']}/{row['worker_fds']}; "
                    f"turns {s['sent']} sent {s['answered']} answered "
                    f"{s['in_flight_at_fault']} at fault {s['lost']} lost {s['open']} open; "
                    f"errors {dict(self.ledger.errors)}"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.args.sample_s)

    def schedule(self) -> list[tuple[float, str]]:
        kinds = [k for k in self.args.faults.split(",") if k and k != "none"]
        if not kinds:
            return []
        start, end = self.warmup, 0.8 * self.duration
        n = max(len(kinds), round(self.args.minutes / 3.3))
        step = (end - start) / n
        return [(start + (i + 0.5) * step, kinds[i % len(kinds)]) for i in range(n)]

    async def faults(self, stopping: asyncio.Event) -> None:
        assert self.server is not None
        server = self.server
        for at, kind in self.schedule():
            delay = at - self.ledger.now()
            if delay > 0:
                try:
                    await asyncio.wait_for(stopping.wait(), delay)
                    return
                except TimeoutError:
                    pass
            fault = self.ledger.fault_started(kind)
            log(f"fault: {kind}")
            if kind == "engine":
                old = await asyncio.to_thread(server.kill_worker)
                fault.detail = f"worker {old} killed"
                ok = await asyncio.to_thread(server.wait_new_worker, old)
                if not ok:
                    fault.detail += "; no new worker within 120 s"
            elif kind == "mosquitto":
                await asyncio.to_thread(self.mosquitto.restart)
            elif kind == "postgres":
                await asyncio.to_thread(self.postgres.restart)
            self.ledger.fault_over(fault)
            log(f"fault over: {kind} after {fault.end - fault.start:.1f} s")  # type: ignore[operator]

    def server_args(self, model: Path) -> list[str]:
        return [
            "--model",
            str(model),
            "--engine-process",
            "--db",
            self.postgres.url,
            "--mqtt",
            self.mosquitto.url,
            "--max-new-tokens",
            str(self.args.max_new_tokens),
            "--max-sessions",
            "500",
            "--max-connections-per-client",
            "1000",
            "--log-format",
            "json",
            "--log-level",
            "info",
            *self.args.serve_arg,
        ]

    async def run(self) -> dict[str, Any]:
        args = self.args
        model = self.tmp / "tiny"
        log("making the tiny model; starting PostgreSQL and mosquitto")
        subprocess.run(
            [sys.executable, "-m", "voice_agent.cli", "make-tiny-model", str(model)],
            check=True,
            capture_output=True,
            cwd=ROOT,
        )
        self.postgres.init()
        self.mosquitto.start()
        trace = self.tmp / "trace.txt" if args.trace else None
        self.server = server = Server(self.tmp, self.server_args(model), trace)
        server.start()
        log(f"server ready on port {server.port} (pid {server.pid}, worker {server.worker_pid()})")
        recordings = [load_pcm(AUDIO_DIR / name).pcm for name in RECORDINGS]
        self.ledger = Ledger()
        idle_start = self.sample("idle_start", await self.kept_mb())
        ctx = Context(server.url, self.ledger, recordings, args.turn_timeout, args.think_s)
        mix = parse_mix(args.mix)
        clients: list[asyncio.Task[None]] = []
        asker = MqttAsker(ctx, self.mosquitto.url) if mix.get("mqtt") else None
        runners = {
            "speech": speech_client,
            "text": typed_client,
            "resume": lambda c, n: typed_client(c, n, "resume"),
            "webrtc": webrtc_client,
            "vanish": vanishing_client,
            "never_read": never_reading_client,
        }
        stop_side = asyncio.Event()
        side = [asyncio.create_task(self.sampler(stop_side))]
        if asker is not None:
            side.append(asyncio.create_task(asker.run()))
        for kind, count in mix.items():
            for i in range(count):
                name = f"soak-{kind.replace('_', '-')}-{i}"
                if kind == "mqtt":
                    assert asker is not None
                    clients.append(asyncio.create_task(asker.device(name)))
                else:
                    clients.append(asyncio.create_task(runners[kind](ctx, name)))
                await asyncio.sleep(0.2)  # a gentle ramp
        side.append(asyncio.create_task(self.faults(ctx.stopping)))
        await asyncio.sleep(max(0.0, self.duration - self.ledger.now()))
        log("time is up: the clients finish the turn in hand")
        loaded = self.sample("end_of_load", await self.kept_mb())
        traced = await self.traced()
        self.draining = True
        ctx.stopping.set()
        _, late = await asyncio.wait(clients, timeout=args.turn_timeout + 30)
        for task in late:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        self.ledger.close_open_turns("timeout")
        failed_tasks = Counter(
            type(r).__name__
            for r in await asyncio.gather(*clients, return_exceptions=True)
            if isinstance(r, BaseException)
        )
        stop_side.set()
        for task in side:
            task.cancel()
        await asyncio.gather(*side, return_exceptions=True)
        log(f"clients gone; the idle server settles for {args.settle_s:g} s")
        await asyncio.sleep(args.settle_s)
        idle_end = self.sample("idle_end", await self.kept_mb())
        exit_code = await asyncio.to_thread(server.stop)
        result = self.report(mix, idle_start, loaded, idle_end, exit_code, failed_tasks, len(late))
        if traced is not None:
            result["trace"] = traced
        return result

    async def traced(self) -> list[str] | None:
        """With --trace: the Python allocations made after the warm-up and
        alive at the end of the load (benchmarks/traced_server.py)."""
        trace = None if self.server is None else self.server.trace
        if trace is None:
            return None
        Path(f"{trace}.go").touch()
        for _ in range(600):  # a big snapshot takes a while
            if trace.exists():
                return trace.read_text().splitlines()
            await asyncio.sleep(0.5)
        return ["the server wrote no trace within 300 s"]

    def report(
        self,
        mix: dict[str, int],
        idle_start: dict[str, Any],
        loaded: dict[str, Any],
        idle_end: dict[str, Any],
        exit_code: int | None,
        failed_tasks: Counter[str],
        late_tasks: int,
    ) -> dict[str, Any]:
        assert self.server is not None
        turns = self.ledger.summary()
        load = [s for s in self.samples if s["phase"] == "load"]
        memory = {
            "server": series_growth(load, "server_rss_mb"),
            # of which: the ended conversations kept for resuming (bounded by
            # --kept-conversation-bytes); the rest is everything else
            "server_kept_conversations": series_growth(load, "server_kept_mb"),
            "server_without_kept": series_growth(
                [
                    {"rest": r["server_rss_mb"] - r["server_kept_mb"]}
                    for r in load
                    if r.get("server_rss_mb") is not None and r.get("server_kept_mb") is not None
                ],
                "rest",
            ),
            "worker": worker_growth(load, "worker_rss_mb", self.warmup),
        }
        fds = {
            "server": series_growth(load, "server_fds"),
            "worker": worker_growth(load, "worker_fds", self.warmup),
            "server_idle_start": idle_start["server_fds"],
            "server_idle_end": idle_end["server_fds"],
        }
        memory["server"]["idle_start"] = idle_start["server_rss_mb"]
        memory["server"]["idle_end"] = idle_end["server_rss_mb"]
        memory["worker"]["idle_start"] = idle_start["worker_rss_mb"]
        memory["worker"]["idle_end"] = idle_end["worker_rss_mb"]
        well_closes = {k: v for k, v in self.ledger.closes.items() if "never_read" not in k}
        failed_resumes = sum(v for k, v in self.ledger.resumes.items() if k.endswith(":failed"))
        growth = memory["server"]["growth_after_warmup"]
        fd_growth = fds["server"]["growth_after_warmup"]
        goals = {
            "server_rss_growth_under_50_mb": growth is not None and growth < GOAL_RSS_MB,
            "fds_flat": fd_growth is not None
            and abs(fd_growth) <= 3
            and idle_end["server_fds"] <= idle_start["server_fds"] + 2,
            "no_turns_lost": turns["lost"] == 0,
            "no_failed_resumes": failed_resumes == 0,
            "well_behaved_unaffected": turns["lost"] == 0 and not well_closes,
        }
        return {
            "benchmark": "soak",
            "minutes": self.args.minutes,
            "machine": {
                "cpus": os.cpu_count(),
                "load_avg_1m_median": statistics.median(s["load_avg_1m"] for s in self.samples),
                "load_avg_at_end": os.getloadavg(),
            },
            "server": {
                "args": [
                    a if not a.startswith("postgresql://") else "postgresql://..."
                    for a in self.server.args
                ],
                "model": "tiny random Qwen2-Audio",
                "exit_code": exit_code,
                "log": log_summary(self.server.log_path),
            },
            "mix": mix,
            "warmup_s": self.warmup,
            "sample_s": self.args.sample_s,
            "faults": [
                {
                    "kind": f.kind,
                    "at_s": round(f.start, 1),
                    "recovered_after_s": None if f.end is None else round(f.end - f.start, 1),
                    "detail": f.detail,
                }
                for f in self.ledger.faults
            ],
            "rss_mb": memory,
            "fds": fds,
            "at_end_of_load": loaded,
            "turns": turns,
            "resumes": {
                "counts": dict(sorted(self.ledger.resumes.items())),
                "failed": failed_resumes,
                "failed_detail": self.ledger.failed_resumes[:20],
            },
            "errors_by_code": dict(sorted(self.ledger.errors.items())),
            "server_closes_seen": dict(sorted(self.ledger.closes.items())),
            "close_causes": dict(sorted(self.ledger.close_causes.items())),
            "well_behaved_close_detail": self.ledger.close_detail,
            "misbehaving_clients": dict(sorted(self.ledger.misbehaving.items())),
            "notes": dict(sorted(self.ledger.notes.items())),
            "client_tasks": {"failed": dict(failed_tasks), "cancelled_at_end": late_tasks},
            "well_behaved_got_every_reply": turns["lost"] == 0,
            "goals": goals,
            "samples": self.samples,
        }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=20.0)
    ap.add_argument("--mix", default=DEFAULT_MIX, help=f"clients per kind (default {DEFAULT_MIX})")
    ap.add_argument("--faults", default=",".join(FAULT_KINDS), help="fault kinds, or none")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--think-s", type=float, default=30.0, help="mean pause between turns")
    ap.add_argument("--sample-s", type=float, default=3.0, help="seconds between samples")
    ap.add_argument("--warmup-s", type=float, help="default: 15 %% of the run, 3 to 180 s")
    ap.add_argument("--turn-timeout", type=float, default=120.0)
    ap.add_argument("--progress-s", type=float, default=30.0)
    ap.add_argument("--settle-s", type=float, default=10.0, help="idle pause, then the last sample")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    ap.add_argument(
        "--trace",
        action="store_true",
        help="tracemalloc in the server from the end of the warm-up (slower; for finding growth)",
    )
    ap.add_argument(
        "--serve-arg", action="append", default=[], help="one more `serve` argument, repeatable"
    )
    args = ap.parse_args()
    if not 0 < args.minutes <= 180:
        ap.error("--minutes: more than 0, at most 180")
    parse_mix(args.mix)
    if set(args.faults.split(",")) - {*FAULT_KINDS, "none", ""}:
        ap.error(f"--faults: {', '.join(FAULT_KINDS)} or none")
    tmp = Path(tempfile.mkdtemp(prefix="voice-agent-soak-"))
    soak = Soak(args, tmp)
    started = time.monotonic()
    try:
        result = await soak.run()
    finally:
        if soak.server is not None:
            soak.server.stop()
        soak.mosquitto.stop()
        soak.postgres.stop()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    result["wall_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM as Ctrl-C: main()'s cleanup stops the children


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _interrupted)
    sys.exit(asyncio.run(main()))
