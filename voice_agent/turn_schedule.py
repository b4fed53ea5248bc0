"""The end-of-turn decision schedule (pure: no asyncio, no I/O).

    Rechecks       the `turn_rechecks` schedule: (silence_ms, threshold) pairs
    parse_rechecks the config text "400:0.8,800:0.6" -> Rechecks
    threshold_at   the probability that closes the turn at each check

The Session uses threshold_at; the detector and its async batcher live in
turn.py (which re-exports these names).
"""

from __future__ import annotations

Rechecks = tuple[tuple[int, float], ...]  # (silence_ms, threshold), silence increasing


def parse_rechecks(text: str) -> Rechecks:
    """`turn_rechecks` as given: "400:0.8,800:0.6" -> ((400, 0.8), (800, 0.6)); "" -> ().
    ValueError when malformed, a threshold is outside 0..1 or silences do not increase."""
    out: list[tuple[int, float]] = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        ms, sep, thr = item.partition(":")
        try:
            if not sep:
                raise ValueError
            pair = (int(ms), float(thr))
        except ValueError:
            raise ValueError(f"turn_rechecks item {item!r} is not SILENCE_MS:THRESHOLD") from None
        if not 0.0 <= pair[1] <= 1.0:
            raise ValueError(f"turn_rechecks threshold {pair[1]} is not 0..1")
        if out and pair[0] <= out[-1][0]:
            raise ValueError("turn_rechecks silences must increase")
        out.append(pair)
    return tuple(out)


def threshold_at(silence_ms: int, threshold: float, rechecks: Rechecks = ()) -> float:
    """The probability that closes the turn at a check after `silence_ms` of
    silence: the threshold of the last recheck at or before it, else `threshold`
    (the one of the first check, at min_silence_ms)."""
    for ms, thr in reversed(rechecks):
        if silence_ms >= ms:
            return thr
    return threshold
