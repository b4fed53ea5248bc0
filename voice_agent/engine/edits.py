"""History edits on ChatML messages: what every engine shares (pure).

The engines keep a conversation's history as the ChatML messages of
engine/prompt.py; an edit (engine/types.py: DropTurns, TruncateReply,
AppendMessage) first finds where it applies in those messages, then each
engine cuts its own ids, clips and cache to match. Pure: no asyncio, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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


def dropped(messages: Sequence[Message], edit: DropTurns) -> Dropped | None:
    """Where DropTurns cuts the messages; None: fewer user messages than edit.n."""
    index = drop_index(messages, edit.n)
    if index is None:
        return None
    gone = messages[index:]
    return Dropped(
        index,
        sum(1 for m in gone if m.get("role") == "user"),
        sum(audio_items(m) for m in gone),
    )


__all__ = [
    "AppendMessage",
    "DropTurns",
    "Dropped",
    "HistoryEdit",
    "Message",
    "TruncateReply",
    "audio_items",
    "drop_index",
    "dropped",
    "last_reply",
    "message_text",
    "text_message",
]
