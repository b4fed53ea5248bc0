"""The remote engine's history (engine/openai.py): ChatML messages and clips,
the API's message format, and history edits applied to them.

The history is the messages every engine's snapshot uses (engine/prompt.py);
a request sends them with audio items as base64 WAV `input_audio` parts. An
edit (engine/types.py) cuts or extends the messages and clips; TruncateReply
counts the last reply's pieces as its Deltas did (one token per piece from
vLLM), or, for a reply this engine did not stream (restored, appended), its
words with their leading whitespace.
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import wave
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from voice_agent.audio import float_to_pcm16, split_clips
from voice_agent.engine import edits, prompt
from voice_agent.engine.base import (
    SAMPLE_RATE,
    AppendMessage,
    AudioArray,
    Conversation,
    DropTurns,
    HistoryEdit,
    TruncateReply,
    TurnInput,
)

_WORD = re.compile(r"\s*\S+")


def wav_base64(audio: AudioArray) -> str:
    """16 kHz mono float32 -> base64 of a PCM16 WAV file."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(float_to_pcm16(audio))
    return base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(turn: TurnInput, clips_before: int) -> tuple[dict[str, Any], list[AudioArray]]:
    """One user turn as a ChatML message in the engines' shared history format
    (audio items name their clip: "clip-N", N counting the conversation's clips)
    and its clips: audio first, then the text."""
    clips = split_clips(turn.audio) if turn.audio is not None else []
    return prompt.user_message(clips_before, len(clips), turn.text), clips


@dataclass
class RemoteState:
    """History as ChatML messages (the format every engine's snapshot uses),
    its audio clips, each clip's base64 WAV once it has been sent, and the
    pieces of the last reply when a turn of this engine wrote it."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    clips: list[AudioArray] = field(default_factory=list)
    encoded: dict[int, str] = field(default_factory=dict)
    last: asyncio.Task[None] | None = None  # the conversation's last turn or edit
    pieces: list[str] | None = None  # the last reply's Delta pieces
    turn_log: edits.TurnLog = field(default_factory=edits.TurnLog)

    def request_messages(
        self, extra: Sequence[dict[str, Any]] = (), clips: Sequence[AudioArray] = ()
    ) -> list[dict[str, Any]]:
        """The messages as the API takes them: audio items become input_audio parts."""
        all_clips = [*self.clips, *clips]
        out = []
        for m in [*self.messages, *extra]:
            if not isinstance(m.get("content"), list):
                out.append({"role": m["role"], "content": m.get("content") or ""})
                continue
            parts = []
            for p in m["content"]:
                if p.get("type") == "audio":
                    n = prompt.clip_number(p.get("audio"))
                    if not 1 <= n <= len(all_clips):
                        continue  # a clip the history does not hold
                    data = self.encoded.get(n) or wav_base64(all_clips[n - 1])
                    if n <= len(self.clips):  # settled in the history: encode it once
                        self.encoded[n] = data
                    audio = {"data": data, "format": "wav"}
                    parts.append({"type": "input_audio", "input_audio": audio})
                elif p.get("type") == "text":
                    parts.append({"type": "text", "text": str(p.get("text", ""))})
            if m["role"] == "user":
                out.append({"role": "user", "content": parts})
            else:
                text = "".join(str(p.get("text", "")) for p in parts if p["type"] == "text")
                out.append({"role": m["role"], "content": text})
        return out


def apply_edit(
    conversation: Conversation, state: RemoteState, edit: HistoryEdit, upto: int
) -> bool:
    """Apply an edit to a settled history (`upto`: the turns submitted before
    it); False: nothing to apply it to."""
    messages = state.messages
    if isinstance(edit, DropTurns):
        cut = edits.dropped(messages, edit, state.turn_log, upto)
        if cut is None:
            return False
        del messages[cut.index :]
        kept = sum(edits.audio_items(m) for m in messages)
        del state.clips[kept:]
        state.encoded = {n: d for n, d in state.encoded.items() if n <= kept}
        state.pieces = None
    elif isinstance(edit, TruncateReply):
        reply = edits.last_reply(messages)
        if reply is None:
            return False
        pieces = state.pieces
        if pieces is None:
            pieces = _WORD.findall(edits.message_text(reply))
        if edit.keep_tokens > len(pieces):
            return False
        state.pieces = pieces[: edit.keep_tokens]
        messages[-1] = {"role": "assistant", "content": "".join(state.pieces)}
    else:
        assert isinstance(edit, AppendMessage)
        messages.append(edits.text_message(edit))
        state.pieces = None
    conversation.audio_clips = len(state.clips)
    return True
