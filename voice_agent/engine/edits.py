"""History edits on ChatML messages: what every engine shares (pure).

The engines keep a conversation's history as the ChatML messages of
engine/prompt.py; an edit (engine/types.py: DropTurns, TruncateReply,
AppendMessage) first finds where it applies in those messages, then each
engine cuts its own ids, clips and cache to match. Each engine also keeps a
short log per conversation of whether its last turns entered the history
(DropTurns(submitted=True) counts them). Pure: no asyncio, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from voice_agent.engine.types import AppendMessage, DropTurns, HistoryEdit, TruncateReply

Message = dict[str, Any]


def drop_index(messages: Sequence[Message], n: int) -> int | None:
    """The index of the n-th last user message; None when there are fewer."""
    seen = 0
    for i in range(len(messages) - 1, -1, -1):
        if messages[i].get("role") == "user":
            seen += 1
            if seen == n:
                return i
    return None


def message_text(message: Message) -> str:
    """A message's text (the text items of a list content, joined)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")
    return ""


def audio_items(message: Message) -> int:
    """How many audio items (clips) a message holds."""
    content = message.get("content")
    if not isinstance(content, list):
        return 0
    return sum(1 for p in content if p.get("type") == "audio")


def text_message(edit: AppendMessage) -> Message:
    """The message AppendMessage appends: a user message as the engines write
    one (a list of items), the others as plain text."""
    if edit.role == "user":
        return {"role": "user", "content": [{"type": "text", "text": edit.text}]}
    return {"role": edit.role, "content": edit.text}


def last_reply(messages: Sequence[Message]) -> Message | None:
    """The last message when it is an assistant reply, else None."""
    if messages and messages[-1].get("role") == "assistant":
        return messages[-1]
    return None


@dataclass(frozen=True)
class Dropped:
    """What DropTurns removes from the end of the messages."""

    index: int  # the first message removed
    turns: int  # user messages removed
    clips: int  # audio items removed


# How many of a conversation's last submitted turns an engine remembers the
# fate of (DropTurns(submitted=True) counts older ones as in the history).
TURN_LOG = 64


@dataclass
class TurnLog:
    """A conversation's submitted turns, numbered from 0 in submission order,
    and whether each entered the history (settled) or left nothing (cancelled
    before it started, failed), for DropTurns(submitted=True). Turns of one
    conversation may end out of order (a waiting turn cancelled before an
    earlier one ends): the numbers keep the order."""

    submitted: int = 0
    fates: dict[int, bool] = field(default_factory=dict)

    def submit(self) -> int:
        """The number of a turn being submitted now."""
        seq = self.submitted
        self.submitted += 1
        return seq

    def note(self, seq: int, entered: bool) -> None:
        """Turn `seq` ended: it entered the history or left nothing."""
        self.fates[seq] = entered
        for old in [k for k in self.fates if k < self.submitted - TURN_LOG]:
            del self.fates[old]

    def merge(self, other: TurnLog) -> None:
        """Take in another copy's fates, numbered as this one (--engine-process:
        the worker's; the parent's own count of turns submitted stands)."""
        self.fates.update(other.fates)
        for old in [k for k in self.fates if k < self.submitted - TURN_LOG]:
            del self.fates[old]

    def in_history(self, upto: int, n: int) -> int:
        """How many of the n turns submitted before turn `upto` are in the
        history (unknown ones, older than the log or before a restore, are)."""
        return sum(self.fates.get(seq, True) for seq in range(upto - n, upto))

    def gone(self, count: int) -> None:
        """The last `count` turns still in the history were dropped."""
        for seq in sorted(self.fates, reverse=True):
            if count == 0:
                return
            if self.fates[seq]:
                self.fates[seq], count = False, count - 1


def dropped(
    messages: Sequence[Message], edit: DropTurns, log: TurnLog, upto: int
) -> Dropped | None:
    """Where DropTurns cuts the messages; None: nothing to drop. `log` is the
    conversation's TurnLog and `upto` its `submitted` when the edit was queued;
    the turns dropped are marked gone in it."""
    n = log.in_history(upto, edit.n) if edit.submitted else edit.n
    index = drop_index(messages, n) if n > 0 else None
    if index is None:
        return None
    gone = messages[index:]
    cut = Dropped(
        index,
        sum(1 for m in gone if m.get("role") == "user"),
        sum(audio_items(m) for m in gone),
    )
    log.gone(cut.turns)
    return cut


__all__ = [
    "AppendMessage",
    "DropTurns",
    "Dropped",
    "HistoryEdit",
    "Message",
    "TruncateReply",
    "TurnLog",
    "audio_items",
    "drop_index",
    "dropped",
    "last_reply",
    "message_text",
    "text_message",
]
