"""One reply's text in, its audio out, sentence by sentence, in order, bounded.

`SentenceAudio(synthesize, sample_rate)` is the one sentence-to-PCM pipeline
every transport uses (speaker.ReplySpeaker streams its output as frames; the
MQTT transport joins it into one WAV, host/speaking.py):

- `feed(text)`: reply text as it is decoded; a SentenceSplitter (split.py)
  cuts it into pieces, each queued as soon as it is complete;
- `finish()`: the text is done (the rest of it is queued; `flush=False`
  leaves out an unfinished last piece);
- `await next()`: the audio of the next piece (float32 mono at
  `sample_rate`), None once the text is finished and every piece was given;
- `prefetch()`: start synthesizing the next waiting piece now (one piece is
  synthesized ahead while the current one is used);
- `cancel()`: nothing more is synthesized; `next()` returns None.

Bounds: at most `max_pending` pieces wait for synthesis; beyond it a new piece
is joined to the last waiting one (nothing is dropped, synthesis gets longer
pieces); at most one synthesis runs ahead. `synthesize(text, rate)` is
speaker.Speech.synthesize (one thread per process).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

import numpy as np

from voice_agent.tts.split import SentenceSplitter

Synthesize = Callable[[str, int], Awaitable[np.ndarray]]

# Pieces waiting for synthesis at most (then joined to the last waiting one).
MAX_PENDING_PIECES = 32


class SentenceAudio:
    """See the module doc."""

    def __init__(
        self,
        synthesize: Synthesize,
        sample_rate: int,
        *,
        max_pending: int = MAX_PENDING_PIECES,
        splitter: SentenceSplitter | None = None,
    ) -> None:
        self._synthesize = synthesize
        self.sample_rate = sample_rate
        self.max_pending = max(1, max_pending)
        self._splitter = splitter if splitter is not None else SentenceSplitter()
        self.pending: deque[str] = deque()
        self.text_done = False
        self.cancelled = False
        self._wake = asyncio.Event()
        self._ahead: asyncio.Future[np.ndarray] | None = None

    def feed(self, text: str) -> None:
        self._queue(self._splitter.feed(text))

    def finish(self, flush: bool = True) -> None:
        """No more text; `flush=False` drops the unfinished last piece."""
        if flush:
            self._queue(self._splitter.flush())
        self.text_done = True
        self._wake.set()

    def cancel(self) -> None:
        self.cancelled = True
        self.pending.clear()
        if self._ahead is not None:
            self._ahead.cancel()
            self._ahead = None
        self._wake.set()

    def _queue(self, pieces: list[str]) -> None:
        if self.cancelled:
            return
        for piece in pieces:
            if len(self.pending) >= self.max_pending:
                self.pending[-1] += " " + piece
            else:
                self.pending.append(piece)
        if pieces:
            self._wake.set()

    def prefetch(self) -> None:
        """Start synthesizing the next waiting piece, unless one already is."""
        if self._ahead is None and self.pending and not self.cancelled:
            text = self.pending.popleft()
            self._ahead = asyncio.ensure_future(self._synthesize(text, self.sample_rate))

    async def next(self) -> np.ndarray | None:
        """The next piece's audio; None when finished (or cancelled)."""
        while not self.cancelled:
            self.prefetch()
            ahead = self._ahead
            if ahead is None:
                if self.text_done:
                    return None
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                audio = await ahead
            finally:
                if self._ahead is ahead:
                    self._ahead = None
            if self.cancelled:
                return None
            self.prefetch()  # the next piece is made while this one is used
            return audio
        return None
