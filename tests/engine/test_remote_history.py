"""The remote engine's history (engine/remote_history.py): edits on its messages and clips."""

from __future__ import annotations

import numpy as np

from voice_agent.engine.base import AppendMessage, Conversation, DropTurns, TruncateReply, TurnInput
from voice_agent.engine.remote_history import RemoteState, apply_edit, user_message


def conversation(*turns: tuple[TurnInput, str]) -> tuple[Conversation, RemoteState]:
    state = RemoteState(messages=[{"role": "system", "content": "Be brief."}])
    conv = Conversation("c", "Be brief.", state=state)
    for turn, reply in turns:
        message, clips = user_message(turn, len(state.clips))
        state.messages += [message, {"role": "assistant", "content": reply}]
        state.clips += clips
        conv.turns += 1
    conv.audio_clips = len(state.clips)
    return conv, state


def test_drop_turns_drops_their_clips() -> None:
    audio = np.zeros(16000, dtype=np.float32)
    conv, state = conversation(
        (TurnInput(audio=audio), "One."), (TurnInput(audio=audio, text="and"), "Two.")
    )
    state.request_messages()  # encodes both clips once
    assert sorted(state.encoded) == [1, 2]
    assert apply_edit(conv, state, DropTurns(1), 0)
    assert (conv.turns, conv.audio_clips, len(state.clips), sorted(state.encoded)) == (2, 1, 1, [1])
    assert [m["role"] for m in state.messages] == ["system", "user", "assistant"]
    assert not apply_edit(conv, state, DropTurns(2), 0)
    assert apply_edit(conv, state, DropTurns(1), 0)
    assert state.messages == [{"role": "system", "content": "Be brief."}] and not state.clips


def test_truncate_reply_counts_pieces_or_words() -> None:
    conv, state = conversation((TurnInput(text="hi"), "Hello there, friend."))
    state.pieces = ["Hel", "lo", " there", ",", " friend."]  # as a turn streamed them
    assert not apply_edit(conv, state, TruncateReply(6), 0)
    assert apply_edit(conv, state, TruncateReply(3), 0)
    assert state.messages[-1] == {"role": "assistant", "content": "Hello there"}
    state.pieces = None  # a restored reply: its words
    assert apply_edit(conv, state, TruncateReply(1), 0)
    assert state.messages[-1]["content"] == "Hello"
    assert apply_edit(conv, state, AppendMessage("user", "typed"), 0)
    assert conv.turns == 1  # turns taken: edits never change it
    assert not apply_edit(conv, state, TruncateReply(0), 0)  # the last is not a reply
    assert state.request_messages()[-1] == {
        "role": "user",
        "content": [{"type": "text", "text": "typed"}],
    }
