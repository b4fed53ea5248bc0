"""Cut streamed reply text into sentences and clauses to speak (pure).

`SentenceSplitter.feed(delta)` returns the pieces that became complete;
`flush()` the rest at the end of the reply. The pieces depend only on the
whole text, never on how it was split into deltas: a cut is made only when
the characters that decide it have arrived.

Rules, in order of preference:
- a sentence ends at `.`, `!`, `?` or `…` (with any closing quotes or
  brackets) followed by whitespace, or at a line break; a `.` after a known
  abbreviation ("Dr.", "e.g."), a single letter (an initial) or inside a
  number ("3.5") does not end one;
- once a piece is `clause_chars` long, it also ends at `,`, `;` or `:`
  followed by whitespace (a clause: earlier first sound, still natural);
- a piece with no such place is cut at the last space within `max_chars`
  (or hard at `max_chars`), so synthesis never waits on an endless clause.

The first piece of a reply is cut early, because its synthesis is what the
listener waits for (the time to first audio): it also ends at any clause mark
(`,` `;` `:` followed by whitespace) whatever its length, and at the first word
boundary after `first_words` words or `first_chars` characters, whichever
comes first ("Sure, | I switched on | the kitchen light." with the defaults
3 and 18; synthesis time follows the length of the text, so long words
count by their characters: Piper on one thread needs about 70 ms for "Sure,"
and 90 to 130 ms for three words, 120 to 160 ms for four). Later pieces are whole sentences (or long
clauses) again, which sound more natural and are synthesized while the first
one plays. `first_words=0` turns the early cut off.

Pieces without a letter or digit ("...", "—") are dropped: nothing to say.
"""

from __future__ import annotations

ABBREVIATIONS = frozenset(
    [
        "mr",
        "mrs",
        "ms",
        "dr",
        "prof",
        "sr",
        "jr",
        "st",
        "vs",
        "etc",
        "e.g",
        "i.e",
        "fig",
        "approx",
        "inc",
        "ltd",
        "co",
        "mt",
        "u.s",
        "cf",
        "al",
        "dept",
        "est",
        "jan",
        "feb",
        "mar",
        "apr",
        "jun",
        "jul",
        "aug",
        "sep",
        "sept",
        "oct",
        "nov",
        "dec",
    ]
)
_ENDS = ".!?…"
_CLAUSE = ",;:"
_CLOSERS = "\"')]}”’»"


def _speakable(piece: str) -> bool:
    return any(c.isalnum() for c in piece)


def _words(text: str) -> int:
    """Words (whitespace-separated, with a letter or digit) in `text`."""
    return sum(1 for w in text.split() if _speakable(w))


def _abbreviation(text: str, dot: int) -> bool:
    """True when the `.` at `dot` ends an abbreviation or an initial."""
    start = dot
    while start > 0 and not text[start - 1].isspace():
        start -= 1
    word = text[start:dot].lstrip("\"'([{“‘«").lower()
    if not word:
        return False
    if len(word) == 1 and word.isalpha():
        return True  # an initial: "J. Smith"
    return word in ABBREVIATIONS


FIRST_WORDS = 3  # the first piece of a reply ends after this many words ...
FIRST_CHARS = 18  # ... or characters, at a word boundary (see the module doc)


class SentenceSplitter:
    """See the module doc. `max_chars` >= 20; `clause_chars` > 0 (at most
    `max_chars`); `first_words` >= 0 (0: no early cut of the first piece);
    `first_chars` > 0."""

    def __init__(
        self,
        max_chars: int = 200,
        clause_chars: int = 60,
        first_words: int = FIRST_WORDS,
        first_chars: int = FIRST_CHARS,
    ) -> None:
        if max_chars < 20 or clause_chars < 1 or first_words < 0 or first_chars < 1:
            raise ValueError(
                "need max_chars >= 20, clause_chars >= 1, first_words >= 0 and first_chars >= 1"
            )
        self.max_chars = max_chars
        self.clause_chars = min(clause_chars, max_chars)
        self.first_words = first_words
        self.first_chars = first_chars
        self._buf = ""
        self._first = first_words > 0  # no speakable piece given out yet

    def feed(self, delta: str) -> list[str]:
        self._buf += delta
        out: list[str] = []
        while True:
            self._buf = self._buf.lstrip()
            end = self._boundary(self._buf)
            if end is None:
                break
            piece, self._buf = self._buf[:end].strip(), self._buf[end:]
            if _speakable(piece):
                out.append(piece)
                self._first = False
        return out

    def flush(self) -> list[str]:
        piece, self._buf = self._buf.strip(), ""
        return [piece] if _speakable(piece) else []

    def _boundary(self, text: str) -> int | None:
        """End index of the first complete piece of `text`, or None (wait)."""
        limit = min(len(text), self.max_chars + 1)
        first = self._first
        clause_chars = 1 if first else self.clause_chars
        i = 0
        while i < limit:
            c = text[i]
            if c == "\n":
                return i + 1
            if (
                first
                and c.isspace()
                and _words(text[:i]) >= 1
                and (i >= self.first_chars or _words(text[:i]) >= self.first_words)
            ):
                return i
            if c in _ENDS or (c in _CLAUSE and i + 1 >= clause_chars):
                j = i + 1
                while j < len(text) and (text[j] in _ENDS or text[j] in _CLOSERS):
                    j += 1  # "?!", "...", closing quotes belong to the sentence
                if j >= len(text):
                    return None  # the next character decides
                if text[j].isspace() and not (c == "." and _abbreviation(text, i)):
                    return j
                i = j
                continue
            i += 1
        if len(text) <= self.max_chars:
            return None
        cut = text.rfind(" ", 0, self.max_chars + 1)
        return cut if cut > 0 else self.max_chars
