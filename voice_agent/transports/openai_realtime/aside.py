"""Out-of-band responses with their own context (pure): response.create
with conversation "none" and `input` -> one Aside call.

The model sees only the response's `input` (`[]`: nothing) after the
system prompt (the response's `instructions`, else the session's): a
throwaway conversation, never the session's history, which it leaves as it
was. The input's messages (and `item_reference`s to the conversation's
items, by their text or transcript: the audio of user items is not kept)
become the history in order; the trailing user messages are the turn the
model answers (their text and audio), or, when the input does not end with
one, a short "your turn" text. It runs beside the conversation (the engine
batches it with the other turns), is never spoken (the transcript only, for
audio output) and can be cancelled by its response id.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from voice_agent.audio import pcm16_to_float, resample
from voice_agent.engine.types import AppendMessage, AudioArray, TurnInput
from voice_agent.errors import Unsupported
from voice_agent.transports.openai_realtime.codec import FORMATS, b64decode, to_pcm16
from voice_agent.transports.openai_realtime.events import ItemIn, ItemRef
from voice_agent.transports.openai_realtime.items import Items

MAX_ASIDES = 2  # out-of-band responses with their own input running at once
P = "response.input"

Entry = tuple[str, str, AudioArray | None]  # role, text, audio (user only)


def _referenced(ref: ItemRef, items: Items, live: dict[str, str]) -> Entry:
    item = items.get(ref.id)
    if item is None:
        raise items.missing(ref.id, P)
    if ref.id in live:  # a reply still in progress: its text so far
        return "assistant", live[ref.id], None
    texts: list[str] = []
    for part in item.get("content", []):
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text"):
            texts.append(str(part.get("text") or ""))
        elif kind == "output_audio" or part.get("transcript") is not None:
            texts.append(str(part.get("transcript") or ""))
        else:  # input_audio without a transcript
            raise Unsupported(
                f"an item_reference to the user audio item {ref.id[:64]!r} (its audio is not "
                "kept: reference it once transcribed, or send the audio in the input)",
                P,
            )
    return str(item.get("role", "user")), "\n".join(t for t in texts if t), None


def _entry(item: ItemIn | ItemRef, items: Items, live: dict[str, str], fmt: str) -> Entry:
    if isinstance(item, ItemRef):
        return _referenced(item, items, live)
    audio = None
    if item.audio:
        pcm = b"".join(to_pcm16(b64decode(a, P), fmt) for a in item.audio)
        audio = resample(pcm16_to_float(pcm), FORMATS[fmt])
    return item.role, "\n".join(item.texts), audio


def _role(role: str) -> Any:
    return role if role in ("system", "assistant") else "user"


def build(
    inputs: tuple[ItemIn | ItemRef, ...],
    items: Items,
    input_format: str,
    speak_first: str,
    live: dict[str, str] | None = None,
) -> tuple[tuple[AppendMessage, ...], TurnInput]:
    """The history (text messages) and the turn of an input (see the module
    doc); `live`: the text so far of replies still in progress, by item id."""
    entries = [_entry(i, items, live or {}, input_format) for i in inputs]
    n = len(entries)
    while n > 0 and entries[n - 1][0] == "user":
        n -= 1
    messages: list[AppendMessage] = []
    for role, text, audio in entries[:n]:
        if audio is not None:
            raise Unsupported(
                "user audio in response.input before a system or assistant message "
                "(only the last user messages may hold audio)",
                P,
            )
        if text.strip():
            messages.append(AppendMessage(_role(role), text))
    texts = [text for _, text, _ in entries[n:] if text.strip()]
    clips = [audio for _, _, audio in entries[n:] if audio is not None]
    if not texts and not clips:
        texts.append(speak_first)
    audio = np.concatenate(clips) if clips else None
    return tuple(messages), TurnInput(audio=audio, text="\n".join(texts) if texts else None)
