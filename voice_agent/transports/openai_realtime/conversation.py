"""The conversation's items as the client makes and removes them (pure):
conversation.item.create and .delete, the user items waiting for a
response (pending), and what each does to the model's history (history.py).

- A user message waits (pending) until response.create sends the pending
  items to the model as one turn.
- A system or assistant message is appended to the model's history
  (AppendMessage); user text items still pending go first, as one user
  message (AppendMessage), so the history keeps the items' order. A pending
  user audio item cannot go first that way (only text is appended): such a
  message is refused until the audio has been answered or deleted.
- Delete: a pending item just leaves; an item of the model's last user
  message drops that whole turn (DropTurns: the user message, its reply and
  what came after; one conversation.item.deleted each, a reply still
  generating is cancelled first); the model's last reply is emptied
  (TruncateReply(0)). Anything older is refused (`unsupported`): the
  history is the model's KV cache, which only ever loses its end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from voice_agent.audio import pcm16_to_float, resample
from voice_agent.engine.types import AppendMessage, AudioArray
from voice_agent.errors import DuplicateItem, InvalidField, Unsupported
from voice_agent.transports.openai_realtime import events as ev
from voice_agent.transports.openai_realtime import transcripts
from voice_agent.transports.openai_realtime.calls import Edit, Out
from voice_agent.transports.openai_realtime.codec import FORMATS, b64decode, to_pcm16
from voice_agent.transports.openai_realtime.history import ModelHistory
from voice_agent.transports.openai_realtime.items import Ids, Items, message_item, user_item
from voice_agent.transports.openai_realtime.responses import Responses
from voice_agent.transports.openai_realtime.settings import Settings


@dataclass
class Pending:
    item_id: str
    text: str | None
    audio: AudioArray | None


class ClientConversation:
    """Items, pending user items and the model's history of one connection."""

    def __init__(
        self, ids: Ids, items: Items, responses: Responses, settings: Callable[[], Settings]
    ) -> None:
        self.ids = ids
        self.items = items
        self.responses = responses
        self.history: ModelHistory = responses.history
        self._settings = settings
        self.pending: list[Pending] = []
        self.edited = False  # the model's history was edited (a message was appended)

    # -- create ---------------------------------------------------------------

    def create(self, r: ev.ItemCreate) -> list[Out]:
        """conversation.item.create (the translator starts the session first
        when this returns an Edit)."""
        item_in = r.item
        previous = r.previous_item_id
        at_end = previous == self.items.last_id or (
            previous == "root" and self.items.last_id is None
        )
        if previous is not None and not at_end:
            raise Unsupported(
                "inserting an item anywhere but at the end of the conversation",
                "previous_item_id",
            )
        item_id = item_in.id or self.ids.next("item")
        if item_id in self.items:
            raise DuplicateItem(f"an item with id {item_id[:64]!r} exists", "item.id")
        text = "\n".join(item_in.texts) if item_in.texts else None
        if item_in.role != "user":
            return self._message(item_id, item_in.role, item_in.texts, text)
        audio: AudioArray | None = None
        if item_in.audio:
            fmt = self._settings().input_format
            pcm = b"".join(
                to_pcm16(b64decode(a, f"item.content[{i}].audio"), fmt)
                for i, a in enumerate(item_in.audio)
            )
            audio = resample(pcm16_to_float(pcm), FORMATS[fmt])
        if audio is None and not (text and text.strip()):
            raise InvalidField("the item has no text", "item.content")
        item = user_item(item_id, item_in.texts, len(item_in.audio))
        return self.user_item(item, text, audio, commit=False)

    def _message(
        self, item_id: str, role: str, texts: tuple[str, ...], text: str | None
    ) -> list[Out]:
        """A system or assistant message: appended to the model's history,
        after the pending user text (see the module doc)."""
        if not (text and text.strip()):
            raise InvalidField("the item has no text", "item.content")
        if any(p.audio is not None for p in self.pending):
            raise Unsupported(
                f"a {role} message after a user audio item that has not been answered "
                "(the history takes text messages only: send response.create first)",
                "item.role",
            )
        out: list[Out] = []
        if self.pending:
            ids = tuple(p.item_id for p in self.pending)
            joined = "\n".join(p.text for p in self.pending if p.text)
            out.append(Edit(AppendMessage("user", joined)))
            self.history.sent(ids, appended=True)
            self.pending.clear()
            self.items.answered()
        out.append(Edit(AppendMessage("system" if role == "system" else "assistant", text)))
        self.history.appended(item_id, role)
        self.edited = True
        item = message_item(item_id, role, texts)
        previous = self.items.add(item)
        e = self.ids.event
        return [
            *out,
            e("conversation.item.added", previous_item_id=previous, item=item),
            e("conversation.item.done", previous_item_id=previous, item=item),
        ]

    def user_item(
        self,
        item: dict[str, Any],
        text: str | None,
        audio: AudioArray | None,
        *,
        commit: bool,
        pending: bool = True,
    ) -> list[Out]:
        """A new user item: committed (from the input buffer), added, done,
        and transcribed when that is on. Pending (answered at response.create)
        unless the Session's VAD answers it itself (pending=False)."""
        item_id = item["id"]
        previous = self.items.add(item, pending=pending)
        if pending:
            self.pending.append(Pending(item_id, text, audio))
        e = self.ids.event
        out: list[Out] = []
        if commit:
            out.append(
                e("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
            )
        out += [
            e("conversation.item.added", previous_item_id=previous, item=item),
            e("conversation.item.done", previous_item_id=previous, item=item),
        ]
        return out + list(transcripts.calls(self._settings().transcription, item_id, audio))

    # -- delete ---------------------------------------------------------------

    def delete(self, r: ev.ItemDelete) -> list[Out]:
        item_id = r.item_id
        if item_id not in self.items:
            raise self.items.missing(item_id)
        if item_id in self.items.pending:
            return self._remove([item_id])
        if self.history.last_user(item_id):
            return self._drop_turn()
        if self.history.last_reply(item_id):
            return self._empty_reply(item_id)
        raise Unsupported(
            "deleting an item the model has heard or said other than the last user "
            "message (with its reply) or the last reply: the history is the model's KV "
            "cache and only its end can be cut",
            "item_id",
        )

    def _drop_turn(self) -> list[Out]:
        """An item of the model's last user message: that turn leaves."""
        turn = self.history.last
        assert turn is not None
        if not turn.reply_started:  # (the Session holds it until the reply in progress ends)
            raise Unsupported(
                "deleting a user item whose turn waits for the response in progress: "
                "cancel that response first",
                "item_id",
            )
        out: list[Out] = []
        response = self.responses.by_item(turn.reply) if turn.reply else None
        if response is not None and response.status == "in_progress":
            out += self.responses.cancel_request(response.id)  # it stops first
        out.append(Edit(self.history.drop(turn)))
        self.history.drop_last()
        return out + self._remove([i for i in turn.items() if i in self.items])

    def _empty_reply(self, item_id: str) -> list[Out]:
        """The model's last reply: it stops, and the history keeps its user
        message with an empty reply."""
        response = self.responses.by_item(item_id)
        out: list[Out] = []
        if response is not None:
            if response.status == "in_progress":
                out += self.responses.cancel_request(response.id)
            out += self.responses.cut(response, 0)
        # (the turn keeps its reply's id: a later drop of the turn then voids a cut
        # still waiting for this reply, which would otherwise land on an older one)
        return out + self._remove([item_id])

    def _remove(self, item_ids: list[str]) -> list[Out]:
        out: list[Out] = []
        for item_id in item_ids:
            self.items.remove(item_id)
            self.pending = [p for p in self.pending if p.item_id != item_id]
            out.append(self.ids.event("conversation.item.deleted", item_id=item_id))
        return out
