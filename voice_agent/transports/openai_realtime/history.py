"""What the model's history holds, in the GA conversation's item ids (pure),
and the engine history edits (engine/types.py) that keep the two together.

The engine keeps the conversation as ChatML messages and their KV cache; a
client sees items. `ModelHistory` follows the model's user turns as they go
to the engine, in order: each `Turn` is one user message (the items it was
made of: an utterance, or the pending items a response.create sent
together), the assistant item that answers it (a response) and the
system/assistant messages appended after it (conversation.item.create).
Only the turns since the session started are known (the last MAX_TURNS).

What can be edited (the rest is refused by name: see docs/openai-realtime.md):

- the last user turn: deleting one of its user items drops the whole turn
  (the user message, its reply and the messages after it): DropTurns with
  submitted=True, counting the turns submitted since it (out-of-band turns,
  dropped already), so a turn that never entered the history (cancelled
  before its first token) drops nothing older; plain DropTurns(1) for an
  appended user message;
- the last reply, while nothing was appended after it: truncated to the
  reply tokens heard (TruncateReply(keep)), or deleted (TruncateReply(0):
  the model keeps its user message and an empty reply).

Token counts: each reply.delta carries one engine Delta, and the engines
decode one Delta per token (a byte-level BPE holds a piece back only until its
character is whole), so the deltas up to a point count the reply's tokens up
to there (give or take a character held back).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voice_agent.engine.types import DropTurns

MAX_TURNS = 64  # turns followed; older ones can no longer be edited


@dataclass
class Turn:
    user: tuple[str, ...]  # the user message's items (empty: none, e.g. a speak-first turn)
    utterance: str | None = None  # the native utterance id (Session VAD turns)
    reply: str | None = None  # the assistant item answering it
    reply_started: bool = False  # a reply to it started (or none will come: an appended message)
    after: list[str] = field(default_factory=list)  # system/assistant items appended after
    index: int | None = None  # its place among the submitted turns (None: appended)

    def items(self) -> list[str]:
        return [*self.user, *([self.reply] if self.reply else []), *self.after]


class ModelHistory:
    def __init__(self) -> None:
        self.turns: list[Turn] = []
        self.submitted = 0  # turns submitted to the engine (out-of-band ones too)

    @property
    def last(self) -> Turn | None:
        return self.turns[-1] if self.turns else None

    def sent(
        self, user: tuple[str, ...], utterance: str | None = None, *, appended: bool = False
    ) -> None:
        """A user turn went to the engine (a response.create, an utterance the
        Session answers, or an appended user message: no reply comes)."""
        index = None
        if not appended:
            self.submitted += 1
            index = self.submitted
        self.turns.append(Turn(user, utterance, reply_started=appended, index=index))
        del self.turns[:-MAX_TURNS]

    def out_of_band(self) -> None:
        """An out-of-band turn was submitted (and will be dropped)."""
        self.submitted += 1

    def drop(self, turn: Turn) -> DropTurns:
        """The edit that drops `turn` and everything after it."""
        if turn.index is None:
            return DropTurns(1)
        return DropTurns(self.submitted - turn.index + 1, submitted=True)

    def replied(self, item_id: str, utterance: str | None) -> None:
        """A reply started: it answers the turn of its utterance, else the
        oldest turn not answered yet."""
        turn = next(
            (
                t
                for t in self.turns
                if not t.reply_started and (utterance is None or t.utterance == utterance)
            ),
            None,
        )
        if turn is None:  # (a turn not followed: a new one, without items)
            self.turns.append(Turn(()))  # (not counted: its submission was not seen)
            turn = self.turns[-1]
        turn.reply, turn.reply_started = item_id, True

    def appended(self, item_id: str, role: str) -> None:
        """A system or assistant message was appended to the history."""
        if role == "user":
            self.sent((item_id,), appended=True)
        elif self.turns:
            self.turns[-1].after.append(item_id)
        else:
            self.turns.append(Turn((), after=[item_id]))

    def forget(self, reply_item: str) -> Turn | None:
        """The turn of `reply_item` left the history (its reply failed, or the
        Session withdrew it: continuation); that turn, if followed."""
        for i, t in enumerate(self.turns):
            if t.reply == reply_item:
                return self.turns.pop(i)
        return None

    def last_reply(self, item_id: str) -> bool:
        """`item_id` is the assistant reply the model's history ends with."""
        t = self.last
        return t is not None and t.reply == item_id and not t.after

    def last_user(self, item_id: str) -> bool:
        """`item_id` is one of the items of the model's last user message."""
        t = self.last
        return t is not None and item_id in t.user

    def drop_last(self) -> Turn:
        """DropTurns(1) was sent: the last turn leaves the history."""
        return self.turns.pop()


def heard_tokens(marks: list[int], chars: int) -> int:
    """How many reply tokens (deltas) lie within the first `chars` characters
    of the streamed text; `marks` are the text's lengths after each delta."""
    n = 0
    for end in marks:
        if end > chars:
            break
        n += 1
    return n
