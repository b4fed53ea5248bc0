"""History edits on ChatML messages (engine/edits.py) and their types (engine/types.py)."""

from __future__ import annotations

import pytest

from voice_agent.engine import edits, prompt
from voice_agent.engine.base import AppendMessage, DropTurns, TruncateReply

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    prompt.user_message(0, 1, "what is this?"),
    {"role": "assistant", "content": "A bell."},
    {"role": "system", "content": "Answer in French."},
    prompt.user_message(1, 2),
    {"role": "assistant", "content": "Deux cloches."},
]


def test_dropped() -> None:
    assert edits.dropped(MESSAGES, DropTurns(1)) == edits.Dropped(4, 1, 2)
    assert edits.dropped(MESSAGES, DropTurns(2)) == edits.Dropped(1, 2, 3)
    assert edits.dropped(MESSAGES, DropTurns(3)) is None
    assert edits.drop_index(MESSAGES, 2) == 1


def test_message_text_and_last_reply() -> None:
    assert edits.message_text(MESSAGES[1]) == "what is this?"
    assert edits.message_text(MESSAGES[2]) == "A bell."
    assert edits.audio_items(MESSAGES[4]) == 2
    assert edits.last_reply(MESSAGES) is MESSAGES[-1]
    assert edits.last_reply(MESSAGES[:4]) is None
    assert edits.last_reply([]) is None


def test_text_message() -> None:
    assert edits.text_message(AppendMessage("user", "hi")) == prompt.user_message(0, 0, "hi")
    assert edits.text_message(AppendMessage("system", "x")) == {"role": "system", "content": "x"}


def test_edits_check_their_fields() -> None:
    with pytest.raises(ValueError):
        DropTurns(0)
    with pytest.raises(ValueError):
        TruncateReply(-1)
    with pytest.raises(ValueError):
        AppendMessage("tool", "x")  # type: ignore[arg-type]
