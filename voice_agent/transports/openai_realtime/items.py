"""Ids and the conversation's items as the GA API shows them (pure).

Ids are numbered per connection under one random tag the connection gives
(`item_<tag><n>`, `resp_<tag><n>`, `event_<tag><n>`), so they are unique
enough for clients and deterministic in tests.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from voice_agent.errors import InvalidField


class Ids:
    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._n = 0

    def next(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}_{self.tag}{self._n:04d}"

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        """A server event: `type`, a fresh `event_id`, then the fields."""
        return {"type": kind, "event_id": self.next("event"), **fields}


def user_item(item_id: str, texts: tuple[str, ...] = (), audio: int = 0) -> dict[str, Any]:
    """A user message item: its text parts, then `audio` input_audio parts
    (their audio is not kept; transcript null: transcription is off)."""
    content: list[dict[str, Any]] = [{"type": "input_text", "text": t} for t in texts]
    content += [{"type": "input_audio", "transcript": None} for _ in range(audio)]
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": "completed",
        "role": "user",
        "content": content,
    }


def message_item(item_id: str, role: str, texts: tuple[str, ...]) -> dict[str, Any]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {
        "id": item_id,
        "object": "realtime.item",
        "type": "message",
        "status": "completed",
        "role": role,
        "content": [{"type": kind, "text": t} for t in texts],
    }


MAX_ITEMS = 4096  # items kept for retrieve/delete/truncate; the oldest go first
MAX_GONE = 64  # items the server removed itself, remembered to say so


class Items:
    """The conversation's items in order, by id (the last MAX_ITEMS: older
    ones can no longer be retrieved). `pending` are user items not yet
    answered (not in the model's history yet: they may be deleted)."""

    def __init__(self) -> None:
        self._items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.pending: set[str] = set()
        self._gone: OrderedDict[str, str] = OrderedDict()  # item id -> why the server removed it

    @property
    def last_id(self) -> str | None:
        return next(reversed(self._items), None) if self._items else None

    def __contains__(self, item_id: str) -> bool:
        return item_id in self._items

    def ids(self) -> list[str]:
        return list(self._items)

    def get(self, item_id: str) -> dict[str, Any] | None:
        return self._items.get(item_id)

    def add(self, item: dict[str, Any], *, pending: bool = False) -> str | None:
        """Append `item`; returns the previous last item's id."""
        previous = self.last_id
        self._items[item["id"]] = item
        if pending:
            self.pending.add(item["id"])
        while len(self._items) > MAX_ITEMS:
            oldest = next(iter(self._items))
            self.remove(oldest)
        return previous

    def remove(self, item_id: str, why: str | None = None) -> None:
        """Remove an item; `why`: the server removed it on its own (a client
        that asks for it later is told so)."""
        self._items.pop(item_id, None)
        self.pending.discard(item_id)
        if why is not None:
            self._gone[item_id] = why
            while len(self._gone) > MAX_GONE:
                self._gone.popitem(last=False)

    def missing(self, item_id: str, param: str = "item_id") -> InvalidField:
        """The error for an item that is not here (and why, if the server removed it)."""
        why = self._gone.get(item_id)
        detail = f": {why}" if why else ""
        return InvalidField(f"no item with id {item_id[:64]!r}{detail}", param)

    def answered(self) -> None:
        """The pending items went to the model."""
        self.pending.clear()
