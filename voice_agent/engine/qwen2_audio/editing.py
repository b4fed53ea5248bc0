"""History edits on the worker thread: DropTurns, TruncateReply, AppendMessage.

An edit waits in the worker's queue in order with its conversation's turns
(scheduler.promote) and is applied between them: it computes the new
messages, ids and clips, then cuts the conversation's KV cache with the
cache's public crop() to the longest prefix of the old ids that the new ids
keep (a cropped cache stays a prefix of the ids; a clip's audio tokens are kept
whole or not at all) and discards a speculative prefill.

Every message of the history starts with one <|im_start|> token in the ids,
as it starts with one "<|im_start|>" in the rendered text: the ids of the
first k messages end where the ids' (c+1)-th <|im_start|> begins, c counting
those in the first k messages' rendering. A settled reply's ids are
"<|im_start|>assistant\\n" + its reply tokens + "<|im_end|>\\n".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from voice_agent.engine import edits
from voice_agent.engine.base import (
    AppendMessage,
    AudioArray,
    Conversation,
    DropTurns,
    HistoryEdit,
    TruncateReply,
    resolve_threadsafe,
)
from voice_agent.engine.qwen2_audio.core import EngineCore
from voice_agent.engine.qwen2_audio.state import Message, _ConvState, _Edit
from voice_agent.errors import EngineError

logger = logging.getLogger("voice_agent.engine")

IM_START = "<|im_start|>"


@dataclass(eq=False)
class _Edited:
    """A conversation's history after an edit (assigned all at once)."""

    messages: list[Message]
    ids: list[int]
    clips: list[AudioArray]
    clip_starts: list[int]


def resolve(e: _Edit, outcome: bool | BaseException) -> None:
    """Settle the edit's future on its loop (from any thread)."""
    resolve_threadsafe(e.future, outcome)


class _Editing(EngineCore):
    """Apply a history edit to an idle conversation (on the worker thread)."""

    def _apply_edit(self, e: _Edit) -> None:
        st = e.state
        st.running = True  # snapshot() answers None while the history changes
        try:
            self._discard_spec(st)
            edited = self._edited(st, e.edit, e.upto)
            if edited is not None:
                self._commit(e.conversation, st, edited)
            outcome: bool | BaseException = edited is not None
        except Exception:
            logger.exception(
                "editing the history of conversation %s failed", e.conversation.conversation_id
            )
            outcome = EngineError("editing the history failed")
        finally:
            st.running = False
        self._touch(st)
        resolve(e, outcome)

    def _edited(self, st: _ConvState, edit: HistoryEdit, upto: int) -> _Edited | None:
        if isinstance(edit, DropTurns):
            return self._drop_turns(st, edit, upto)
        if isinstance(edit, TruncateReply):
            return self._truncate_reply(st, edit)
        assert isinstance(edit, AppendMessage)
        return self._append_message(st, edit)

    def _drop_turns(self, st: _ConvState, edit: DropTurns, upto: int) -> _Edited | None:
        cut = edits.dropped(st.messages, edit, st.turn_log, upto)
        if cut is None:
            return None
        messages = st.messages[: cut.index]
        clips = len(st.clips) - cut.clips
        ids: list[int] = []  # nothing rendered yet: the next turn renders the messages
        if st.ids:
            ids = st.ids[: self._message_start(st, messages)]
            if any(s >= len(ids) for s in st.clip_starts[:clips]):
                raise RuntimeError("the kept clips are not in the kept ids")
        return _Edited(messages, ids, st.clips[:clips], st.clip_starts[:clips])

    def _message_start(self, st: _ConvState, messages: list[Message]) -> int:
        """Where the ids of the history's first len(messages) messages end."""
        im_start = self._im_start_id()
        starts = [i for i, x in enumerate(st.ids) if x == im_start]
        if self._render(st.messages, False).count(IM_START) != len(starts):
            raise RuntimeError("the history's ids do not match its messages")
        n = self._render(messages, False).count(IM_START) if messages else 0
        return starts[n] if n < len(starts) else len(st.ids)

    def _truncate_reply(self, st: _ConvState, edit: TruncateReply) -> _Edited | None:
        reply = edits.last_reply(st.messages)
        if reply is None:
            return None
        keep = edit.keep_tokens
        if not st.ids:  # an appended reply not rendered yet: cut its text
            tokens = self._encode(edits.message_text(reply))
            if keep > len(tokens):
                return None
            text = self._decode_text(tokens[:keep])
            messages = [*st.messages[:-1], {"role": "assistant", "content": text}]
            return _Edited(messages, [], list(st.clips), list(st.clip_starts))
        header = self._encode(f"{IM_START}assistant\n")
        tail = [self._im_end_id, *self._newline_ids]
        start = len(st.ids) - 1 - st.ids[::-1].index(self._im_start_id())
        body = start + len(header)
        if st.ids[start:body] != header or st.ids[len(st.ids) - len(tail) :] != tail:
            raise RuntimeError("the last reply's ids are not a settled reply")
        tokens = st.ids[body : len(st.ids) - len(tail)]
        if keep > len(tokens):
            return None
        text = self._decode_text(tokens[:keep])
        messages = [*st.messages[:-1], {"role": "assistant", "content": text}]
        ids = [*st.ids[:body], *tokens[:keep], *tail]
        return _Edited(messages, ids, list(st.clips), list(st.clip_starts))

    def _append_message(self, st: _ConvState, edit: AppendMessage) -> _Edited:
        message = edits.text_message(edit)
        messages = [*st.messages, message]
        if st.ids:
            before = self._render(st.messages, False)
            after = self._render(messages, False)
            if not after.startswith(before):
                raise RuntimeError("the chat template is not prefix-stable")
            ids = [*st.ids, *self._encode(after[len(before) :])]
        elif any(edits.audio_items(m) for m in st.messages):
            ids = []  # clips not rendered yet: the next turn renders them all
        else:
            ids = self._encode(self._render(messages, False))
        return _Edited(messages, ids, list(st.clips), list(st.clip_starts))

    def _commit(self, conversation: Conversation, st: _ConvState, new: _Edited) -> None:
        """Put the edited history in place; the cache keeps what still matches."""
        keep = self._kept_prefix(st.ids, new.ids, st.cached_tokens(), new.clip_starts)
        cached = st.cached_tokens()
        if st.cache is not None and cached > keep:
            if keep == 0:
                st.cache = None
            else:
                st.cache.crop(-(cached - keep))  # crop(-n) removes n tokens
        st.messages, st.ids = new.messages, new.ids
        st.clips, st.clip_starts = new.clips, new.clip_starts
        conversation.audio_clips = len(st.clips)

    def _kept_prefix(self, old: list[int], new: list[int], cached: int, starts: list[int]) -> int:
        """How many cached tokens stay valid: the common prefix of the old and
        new ids within the cache, moved back to a clip's start if it would cut
        the clip's audio tokens."""
        keep = min(cached, len(old), len(new))
        if old[:keep] != new[:keep]:
            keep = next(i for i in range(keep) if old[i] != new[i])
        audio = self._audio_token_id
        inside = 0 < keep < len(new) and new[keep - 1] == audio and new[keep] == audio
        if inside:  # the cut would split a clip's audio tokens: keep none of them
            keep = max(s for s in starts if s < keep)
        return keep

    def _encode(self, text: str) -> list[int]:
        enc = self.processor(text=[text], return_tensors="pt")
        return [int(i) for i in enc["input_ids"][0].tolist()]

    def _im_start_id(self) -> int:
        return int(self.processor.tokenizer.convert_tokens_to_ids(IM_START))
