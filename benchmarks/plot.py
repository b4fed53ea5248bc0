"""Charts from benchmarks/engine.py's JSON, as PNG files README can show.

    python benchmarks/engine.py > engine.json
    python benchmarks/plot.py engine.json --out docs/benchmarks

Writes ttft_by_turn.png (TTFT by turn with and without KV reuse),
decode_throughput.png (aggregate tokens/s by concurrent conversations) and
speculative_prefill.png (end of speech to first token with and without).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt


def _label(data: dict[str, Any]) -> str:
    where = data.get("gpu") or f"CPU, {data.get('cpu_threads', '?')} threads"
    return f"{data.get('model', '?')} model, {data.get('dtype', '?')}, {where}"


def ttft_by_turn(data: dict[str, Any], out: Path) -> Path:
    curves = data["conversation"]["ttft_ms_by_turn"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for key, label in (("no_reuse", "re-run the whole history"), ("kv_reuse", "KV cache reuse")):
        ys = curves.get(key)
        if ys:
            ax.plot(range(1, len(ys) + 1), ys, marker="o", label=label)
    secs = data.get("audio_seconds", 5)
    ax.set(
        xlabel="turn",
        ylabel="time to first token (ms)",
        title=f"TTFT by turn, {secs:g} s utterances\n{_label(data)}",
    )
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    path = out / "ttft_by_turn.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def decode_throughput(data: dict[str, Any], out: Path) -> Path:
    by_n = data["decode_throughput"]["by_concurrency"]
    ns = sorted(by_n, key=int)
    values = [by_n[n]["tokens_per_s"] for n in ns]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    bars = ax.bar(ns, values, color="tab:green")
    one = values[0] if ns and ns[0] == "1" else None
    for bar, v in zip(bars, values, strict=True):
        text = f"{v:.0f}" + (f"\n{v / one:.1f}x" if one else "")
        ax.annotate(
            text, (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom", fontsize=9
        )
    ax.set(
        xlabel="concurrent conversations",
        ylabel="aggregate decode tokens/s",
        title=f"Decode throughput, continuous batching\n{_label(data)}",
    )
    ax.set_ylim(top=max(values) * 1.25 if values else 1)
    ax.grid(axis="y", alpha=0.3)
    path = out / "decode_throughput.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def speculative(data: dict[str, Any], out: Path) -> Path | None:
    spec = data.get("speculative_prefill")
    if not spec:
        return None
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    labels = ["without", "with speculative prefill"]
    values = [spec["without_ms"], spec["with_ms"]]
    bars = ax.bar(labels, values, color=["tab:gray", "tab:blue"])
    for bar, v in zip(bars, values, strict=True):
        ax.annotate(f"{v:.1f} ms", (bar.get_x() + bar.get_width() / 2, v), ha="center", va="bottom")
    ax.set(
        ylabel="end of speech to first token (ms)",
        title=f"Speculative prefill during the hangover\n{_label(data)}",
    )
    ax.set_ylim(top=max(values) * 1.25 if max(values) > 0 else 1)
    path = out / "speculative_prefill.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("json", help="output of benchmarks/engine.py ('-' for stdin)")
    ap.add_argument("--out", default="docs/benchmarks", help="directory for the PNG files")
    args = ap.parse_args(argv)
    text = sys.stdin.read() if args.json == "-" else Path(args.json).read_text()
    data = json.loads(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in (ttft_by_turn(data, out), decode_throughput(data, out), speculative(data, out)):
        if path is not None:
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
