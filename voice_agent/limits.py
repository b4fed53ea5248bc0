"""Per-connection limits as pure arithmetic on an injected clock (no I/O).

`TokenBucket` answers "how long must the reader wait before this much more
work is allowed?": the transport sleeps that long before reading the next
message, so a sender that is too fast is slowed down by TCP instead of being
buffered. `MessageLimiter` (messages per second) and `AudioPacer` (audio
seconds per second, i.e. a multiple of real time) are both token buckets.
"""

from __future__ import annotations

import math
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """`rate` units a second, at most `burst` units saved up.

    `take(n)` spends n units and returns the seconds to wait before the spend
    is within the rate (0.0 when it already is). The debt never grows beyond
    what the caller has been told to wait for, because the caller waits.
    """

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._level = burst  # units available now
        self._at = clock()

    def take(self, n: float, now: float | None = None) -> float:
        """Spend n units at `now` (default: the clock's time)."""
        if now is None:
            now = self._clock()
        elapsed = max(0.0, now - self._at)
        self._at = now
        self._level = min(self.burst, self._level + elapsed * self.rate) - n
        if self._level >= 0:
            return 0.0
        return -self._level / self.rate

    @property
    def level(self) -> float:
        return self._level


class MessageLimiter(TokenBucket):
    """`per_second` messages a second, bursts of one second's worth."""

    def __init__(self, per_second: float, clock: Clock) -> None:
        super().__init__(per_second, max(1.0, per_second), clock)

    def message(self, now: float | None = None) -> float:
        return self.take(1.0, now)


class AudioPacer(TokenBucket):
    """Audio at most `speed` times real time after an allowance of `burst_s`
    seconds of audio (a client catching up after a network hiccup)."""

    def __init__(self, speed: float, clock: Clock, burst_s: float = 10.0) -> None:
        super().__init__(speed, burst_s, clock)
        self.throttled_s = 0.0  # total wait imposed so far

    def audio(self, seconds: float, now: float | None = None) -> float:
        wait = self.take(seconds, now)
        if wait > 0 and math.isfinite(wait):
            self.throttled_s += wait
        return wait
