"""Output: reply text decoded piecewise and sent, turns settled into the
conversation's history, results and failures."""

from __future__ import annotations

import logging

from voice_agent.engine.base import Delta, Timing, TurnResult, Usage
from voice_agent.engine.qwen2_audio.core import EngineCore
from voice_agent.engine.qwen2_audio.state import _Turn
from voice_agent.errors import EngineError

logger = logging.getLogger("voice_agent.engine")


class _Output(EngineCore):
    """Deltas, settling a finished turn, its result or its failure."""

    def _emit(self, t: _Turn) -> None:
        """Send the reply text decoded since the last piece (incrementally: a
        byte-level BPE decodes piecewise once a piece ends on a whole character)."""
        text = self._decode_text(t.reply[t.emit_from :])
        if not text or text.endswith("\ufffd"):
            return
        t.emitted += text
        t.emit_from = len(t.reply)
        if not t.first_delta:
            t.first_delta = self._clock()
        delta = Delta(text, len(t.reply))
        if self._deferred is not None:
            self._deferred.append((t.handle, delta))
        else:
            t.handle.push(delta)

    def _decode_text(self, ids: list[int]) -> str:
        return str(
            self.processor.tokenizer.decode(
                ids, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        )

    def _settle(self, t: _Turn, keep: int) -> str:
        """Write the turn into the conversation: history ids, messages, clips, cache."""
        st = t.state
        kept = t.reply[:keep]
        text = self._decode_text(kept)
        assert t.new_message is not None
        st.ids = [*t.prompt_ids, *kept, self._im_end_id, *self._newline_ids]
        st.messages.extend([t.new_message, {"role": "assistant", "content": text}])
        st.clips.extend(t.new_clips)
        st.clip_starts.extend(t.new_starts)
        if self.kv_reuse and t.cache is not None:
            in_cache = len(t.prompt_ids) + t.fed
            target = len(t.prompt_ids) + min(keep, t.fed)
            if in_cache > target:
                t.cache.crop(-(in_cache - target))  # 5.24: crop(-n) removes n tokens
            st.cache = t.cache
        else:
            st.cache = None
        t.cache = None
        t.conversation.turns += 1
        t.conversation.audio_clips = len(st.clips)
        self._log_turn(t, entered=True)
        st.running = False
        self._touch(st)
        if self._batch is not None:
            self._enforce_budget(self._batch, [])
        return text

    @staticmethod
    def _log_turn(t: _Turn, entered: bool) -> None:
        """Note once whether the turn entered its conversation's history."""
        if not t.logged:
            t.logged = True
            t.state.turn_log.note(t.seq, entered)

    def _usage_timing(self, t: _Turn) -> tuple[Usage, Timing]:
        now = self._clock()
        usage = Usage(
            prompt_tokens=len(t.prompt_ids),
            cached_tokens=t.cached_tokens,
            completion_tokens=len(t.reply),
        )
        first = t.first_delta or now
        timing = Timing(
            queue_ms=(t.started - t.submitted) * 1000.0,
            ttft_ms=(first - t.submitted) * 1000.0,
            total_ms=(now - t.submitted) * 1000.0,
        )
        return usage, timing

    def _finish(self, t: _Turn, cancelled: bool) -> None:
        keep = len(t.reply)
        if cancelled and t.handle.keep_tokens is not None:
            keep = min(keep, t.handle.keep_tokens)
        if not cancelled:
            # Flush text held back for an incomplete UTF-8 character.
            text = self._decode_text(t.reply)
            if text != t.emitted and text.startswith(t.emitted):
                if not t.first_delta:
                    t.first_delta = self._clock()
                t.handle.push(Delta(text[len(t.emitted) :], len(t.reply)))
        text = self._settle(t, keep)
        usage, timing = self._usage_timing(t)
        t.handle.push(TurnResult(text, usage, timing, cancelled=cancelled))

    def _finish_cancel(self, t: _Turn) -> None:
        if t.prefilled:
            self._finish(t, cancelled=True)
        else:
            if t.state.running and t.started:
                t.state.running = False
            self._drop_unstarted(t)

    def _drop_unstarted(self, t: _Turn) -> None:
        """A turn cancelled before its prefill: nothing enters the history."""
        self._log_turn(t, entered=False)
        usage, timing = self._usage_timing(t)
        t.handle.push(TurnResult("", usage, timing, cancelled=True))

    def _fail(self, t: _Turn) -> None:
        logger.exception(
            "the model failed on a turn of conversation %s", t.conversation.conversation_id
        )
        self._log_turn(t, entered=False)
        t.state.cache = None  # rebuilt from the history next turn
        t.state.spec = None
        t.state.running = False
        t.cache = None
        t.handle.push(EngineError("the model failed on this turn"))
