"""Charts from benchmarks/engine.py's JSON, as PNG files README can show.

    python benchmarks/engine.py > engine.json
    python benchmarks/plot.py engine.json --out docs/benchmarks

Given benchmarks/turn_segments.py's JSON instead it writes turn-segments.png
(false cut-offs against end-of-turn delay; turn_segments.py writes it too);
benchmarks/turns.py draws turns.png itself (felt_chart).

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


def turns_chart(data: dict[str, Any], path: Path) -> Path:
    """benchmarks/turn_segments.py: false cut-offs against mean end-of-turn delay, for
    the silence hangover (a line over its lengths), every model policy swept
    and the named ones; left per case, right per pause (no pause counted
    twice). The goal is the green box."""
    results, sweep = data["results"], data.get("sweep", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    panels = (("false_cutoff_rate", "per case"), ("per_pause_rate", "per pause"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.add_patch(plt.Rectangle((0, 0), 400, 0.05, color="tab:green", alpha=0.25, label="goal"))
        sil = sorted(
            (r["mean_delay_ms"], r[key], name)
            for name, r in results.items()
            if name[:7] == "silence"
        )
        ax.plot(
            [x for x, _, _ in sil],
            [y for _, y, _ in sil],
            "o-",
            color="tab:blue",
            label="silence hangover",
        )
        for x, y, name in sil:
            ax.annotate(
                name.split()[1],
                (x, y),
                textcoords="offset points",
                xytext=(3, 4),
                fontsize=7,
                color="tab:blue",
            )
        for kind, color in (
            ("one check", "tab:orange"),
            ("every", "tab:red"),
            ("falling", "tab:purple"),
        ):
            pts = [(r["mean_delay_ms"], r[key]) for n, r in sweep.items() if n.startswith(kind)]
            if pts:
                ax.scatter(
                    *zip(*pts, strict=True),
                    s=12,
                    color=color,
                    alpha=0.6,
                    label=f"model: {kind}{' 200 ms' if kind == 'every' else ''}",
                )
        for name, r in results.items():
            if name.startswith("model"):
                star = "picked" in name
                ax.scatter(
                    [r["mean_delay_ms"]],
                    [r[key]],
                    marker="*" if star else "D",
                    s=120 if star else 30,
                    color="black",
                    zorder=5,
                )
                label = "picked (in-sample)" if star else name.replace("model ", "")
                ax.annotate(
                    label,
                    (r["mean_delay_ms"], r[key]),
                    textcoords="offset points",
                    xytext=(-60, 12) if star else (4, -10),
                    fontsize=7,
                )
        loo = data.get("leave_one_recording_out", {}).get("pooled", {})
        if loo.get(key) is not None and loo.get("mean_delay_ms") is not None:
            ax.scatter(
                [loo["mean_delay_ms"]],
                [loo[key]],
                marker="*",
                s=120,
                facecolors="none",
                edgecolors="black",
                zorder=5,
                label="picked, held-out recordings",
            )
        ax.set(xlabel="mean end-of-turn delay (ms)", title=f"False cut-offs {title}")
        ax.set_xlim(0, 1700)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("false cut-off rate")
    axes[1].legend(loc="upper right", fontsize=7)
    n = data.get("cases", {})
    fig.suptitle(
        f"End of turn on {len(data.get('recordings', []))} real recordings "
        f"({n.get('whole', '?')} whole, {n.get('cut', '?')} cut): silence vs "
        f"{data.get('model', 'model')} ({data.get('model_call_ms', '?')} ms a call)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def felt_chart(data: dict[str, Any], path: Path) -> Path:
    """benchmarks/turns.py: fragments answered (left) and talk-over stop p95
    (right) against the mean last word to first reply audio; the silence
    hangover as a line over its lengths and the model's thresholds, without
    continuation and with the picked continue window and heard limit (the
    other windows and limits faint); the goal shaded."""
    results = data["results"]
    star = data.get("picked") or data.get("closest_under_goal_latency") or {}
    picked = star.get("name", "")
    what = "picked" if data.get("picked") else "nothing meets the rule; closest under 500 ms"
    window = picked.split("continue ")[1] if "continue " in picked else None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    panels = (
        ("fragment_rate_cut", "fragments answered (share of cut cases)", 0.01),
        ("talk_over_stop_p95_ms", "talk-over: user resumes to audio stopped, p95 (ms)", 300),
    )
    for ax, (key, ylabel, goal) in zip(axes, panels, strict=True):
        ax.add_patch(plt.Rectangle((0, 0), 500, goal, color="tab:green", alpha=0.25, label="goal"))
        for name, r in results.items():
            faint = "continue" in name and (window is None or not name.endswith(window))
            if faint and r.get(key) is not None and r.get("latency_mean_ms") is not None:
                ax.scatter(r["latency_mean_ms"], r[key], s=6, color="tab:gray", alpha=0.3)
        series = (
            ("silence", False, "tab:blue", "silence hangover"),
            ("silence", True, "tab:orange", f"silence + continue {window}"),
            ("model", False, "tab:purple", "model threshold"),
            ("model", True, "tab:red", f"model + continue {window}"),
        )
        for kind, cont, color, label in series:
            pts = []
            for name, r in results.items():
                if not name.startswith(kind) or ("continue" in name) != cont:
                    continue
                if cont and (window is None or not name.endswith(window)):
                    continue
                if r.get(key) is None or r.get("latency_mean_ms") is None:
                    continue
                tag = name.split(",")[0].split(" ")[1].replace("p>=", "")
                pts.append((r["latency_mean_ms"], r[key], tag))
            if not pts:
                continue
            pts.sort()
            ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], "o-", color=color, label=label)
            for x, y, tag in pts:
                ax.annotate(tag, (x, y), textcoords="offset points", xytext=(3, 4), fontsize=7)
        if picked in results and results[picked].get(key) is not None:
            r = results[picked]
            ax.scatter(r["latency_mean_ms"], r[key], marker="*", s=160, color="black", zorder=5)
        for name, r in data.get("barge_in_variants", {}).items():
            if r.get(key) is not None:
                ax.scatter(r["latency_mean_ms"], r[key], marker="x", color="tab:green", zorder=5)
                tag = "barge-in " + name.split("barge-in ")[1]
                ax.annotate(
                    tag,
                    (r["latency_mean_ms"], r[key]),
                    xytext=(4, -10),
                    fontsize=7,
                    textcoords="offset points",
                    color="tab:green",
                )
        ax.set(xlabel="last word to first reply audio, mean (ms)", ylabel=ylabel)
        ax.set_xlim(left=0)
        ax.set_ylim(bottom=0)
        if key == "fragment_rate_cut":  # linear below 2 %, where the goal is
            ax.set_yscale("symlog", linthresh=0.02)
            ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=7)
    n = data.get("cases", {})
    fig.suptitle(
        f"Turn-taking as felt: {n.get('whole', '?')} whole and {n.get('cut', '?')} cut "
        f"sentences of {len(data.get('recordings', []))} recordings, Piper, scripted engine\n"
        f"star: {what} ({picked or 'none'}); x: the same with shorter barge-in lengths",
        fontsize=9,
    )
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
    if "barge_in_variants" in data:  # benchmarks/turns.py
        print(felt_chart(data, out / "turns.png"))
        return 0
    if "sweep" in data:  # benchmarks/turn_segments.py
        print(turns_chart(data, out / "turn-segments.png"))
        return 0
    for path in (ttft_by_turn(data, out), decode_throughput(data, out), speculative(data, out)):
        if path is not None:
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
