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
    log = edits.TurnLog()
    assert edits.dropped(MESSAGES, DropTurns(1), log, 0) == edits.Dropped(4, 1, 2)
    assert edits.dropped(MESSAGES, DropTurns(2), log, 0) == edits.Dropped(1, 2, 3)
    assert edits.dropped(MESSAGES, DropTurns(3), log, 0) is None
    assert edits.drop_index(MESSAGES, 2) == 1


def test_dropped_submitted_turns_follow_the_turn_log() -> None:
    log = edits.TurnLog()
    first, second, third = log.submit(), log.submit(), log.submit()
    log.note(third, False)  # cancelled while waiting: it ends before the second
    log.note(first, True)
    log.note(second, True)
    upto = log.submitted
    assert edits.dropped(MESSAGES, DropTurns(1, submitted=True), log, upto) is None
    assert edits.dropped(MESSAGES, DropTurns(2, submitted=True), log, upto) == edits.Dropped(
        4, 1, 2
    )
    assert log.fates == {0: True, 1: False, 2: False}  # the second is gone now
    assert edits.dropped(MESSAGES[:4], DropTurns(2, submitted=True), log, upto) is None
    # Turns from before the log (a restored conversation) are in the history.
    fresh = edits.TurnLog()
    assert edits.dropped(MESSAGES, DropTurns(1, submitted=True), fresh, 0) == edits.Dropped(4, 1, 2)
    for _ in range(edits.TURN_LOG + 5):
        log.note(log.submit(), True)
    assert len(log.fates) <= edits.TURN_LOG + 1


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


def test_turn_log_merge_keeps_its_own_count() -> None:
    parent, worker = edits.TurnLog(), edits.TurnLog()
    for _ in range(3):
        parent.submit()
    worker.note(worker.submit(), True)
    worker.note(worker.submit(), False)
    parent.merge(worker)
    assert parent.submitted == 3 and parent.fates == {0: True, 1: False}
    assert parent.in_history(3, 3) == 2  # the third is still out: counted as in
