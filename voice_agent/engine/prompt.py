"""The "Audio N" user message: one builder for every engine and serve-model.

Every engine keeps a conversation's history in one shared format, the ChatML
messages the Qwen2-Audio chat template renders: a user turn is
`{"role": "user", "content": [items]}` whose audio items name their clip
`"clip-N"` (N counts the clips of the whole conversation, from 1) and whose
text items carry the text. The template turns each audio item into
`Audio N: <|audio_bos|><|AUDIO|><|audio_eos|>` (numbering the clips itself)
and the text follows. A turn of the engines puts its audio first, then its
text (audio analysis: the instruction after the clip it is about).

Pure: no torch, no asyncio, no I/O; the clips themselves are the caller's.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

Message = dict[str, Any]

CLIP_PREFIX = "clip-"  # the name of an audio item: "clip-N"


def audio_item(number: int) -> dict[str, str]:
    """The content item of the conversation's clip `number` (from 1)."""
    if number < 1:
        raise ValueError("clips are numbered from 1")
    return {"type": "audio", "audio": f"{CLIP_PREFIX}{number}"}


def text_item(text: str) -> dict[str, str]:
    return {"type": "text", "text": text}


def clip_number(name: object) -> int:
    """The number N of a "clip-N" audio item's name; 0 for anything else."""
    if isinstance(name, str) and name.startswith(CLIP_PREFIX):
        digits = name[len(CLIP_PREFIX) :]
        if digits.isdigit():
            return int(digits)
    return 0


def user_content(items: Iterable[dict[str, str]]) -> Message:
    """A user message of these content items, in this order."""
    return {"role": "user", "content": list(items)}


def user_message(clips_before: int, new_clips: int, text: str | None = None) -> Message:
    """One user turn: `new_clips` audio items numbered after the conversation's
    `clips_before` clips, then the text when there is any."""
    if clips_before < 0 or new_clips < 0:
        raise ValueError("clip counts cannot be negative")
    items = [audio_item(clips_before + i + 1) for i in range(new_clips)]
    if text:
        items.append(text_item(text))
    return user_content(items)
