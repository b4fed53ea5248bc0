"""The soak's time series (benchmarks/soak.py): growth of a sampled figure
after the warm-up, of the engine worker that was alive last, and the server
log's levels and most frequent warnings."""

from __future__ import annotations

import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any


def series_growth(rows: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """First, last and max after the warm-up, and the growth: of the medians
    of the first and the last tenth of the samples (at least 3 each;
    `growth_after_warmup`, what the goal is on: RSS swings by a few hundred
    MB from one sample to the next while replies are synthesized), of the
    two single samples, and of the smallest value of each tenth."""
    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return {"after_warmup": None, "end": None, "max": None, "growth_after_warmup": None}
    n = max(3, len(values) // 10)
    head, tail = values[:n], values[-n:]
    return {
        "after_warmup": values[0],
        "end": values[-1],
        "max": max(values),
        "median_first_tenth": statistics.median(head),
        "median_last_tenth": statistics.median(tail),
        "growth_after_warmup": round(statistics.median(tail) - statistics.median(head), 1),
        "growth_first_to_last_sample": round(values[-1] - values[0], 1),
        "growth_of_minimum": round(min(tail) - min(head), 1),
        "samples": len(values),
    }


def worker_growth(rows: list[dict[str, Any]], key: str, warmup: float) -> dict[str, Any]:
    """Growth of the last worker process, from `warmup` after its first sample
    (a killed worker's successor starts small and warms up again)."""
    if not rows or rows[-1].get("worker_pid") is None:
        return series_growth([], key)
    pid = rows[-1]["worker_pid"]
    mine = [r for r in rows if r.get("worker_pid") == pid]
    born = mine[0]["t_s"]
    first_gen = all(r.get("worker_pid") == pid for r in rows)
    settled = mine if first_gen else [r for r in mine if r["t_s"] >= born + warmup]
    out = series_growth(settled, key)
    out["pid"] = pid
    out["measured_from_s"] = settled[0]["t_s"] if settled else None
    out["workers_seen"] = len({r.get("worker_pid") for r in rows if r.get("worker_pid")})
    return out


def log_summary(path: Path) -> dict[str, Any]:
    levels: Counter[str] = Counter()
    messages: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            levels["non_json"] += 1
            continue
        level = str(record.get("level", "?")).lower()
        levels[level] += 1
        if level in ("warning", "error", "critical"):
            messages[f"{level}: {str(record.get('msg', record.get('message', '')))[:100]}"] += 1
    return {"levels": dict(levels), "warnings_and_errors": dict(messages.most_common(15))}
