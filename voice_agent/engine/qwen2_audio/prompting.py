"""Prompt building: the new user turn rendered with the model's chat template,
tokenized with its clips, and the clips' log-mel features."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from voice_agent.engine import prompt
from voice_agent.engine.base import SAMPLE_RATE, AudioArray, Conversation, History, TurnInput
from voice_agent.engine.qwen2_audio.core import EngineCore
from voice_agent.engine.qwen2_audio.state import Message, _ConvState, _Prefill, _Prep, split_clips


class _Prompting(EngineCore):
    """The ids and features a prefill needs."""

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        if not messages:
            return ""
        return str(
            self.processor.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt
            )
        )

    def _features(self, clips: list[AudioArray]) -> tuple[torch.Tensor, torch.Tensor]:
        fe = self.processor.feature_extractor
        out = fe(
            clips,
            sampling_rate=SAMPLE_RATE,
            padding="max_length",
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_features"], out["attention_mask"]

    def _prepare(self, t: _Prefill, st: _ConvState, turn: TurnInput) -> _Prep:
        """Everything of a prefill but the forward: the new message rendered and
        tokenized, the prompt ids, the cache to extend and the clips to encode.
        Sets t's fields but next_token and cache; changes nothing in st."""
        if self.probe is not None:
            self.probe("prepare", turn)
        t.new_clips = [] if turn.audio is None else split_clips(turn.audio)
        t.new_message = prompt.user_message(len(st.clips), len(t.new_clips), turn.text)
        # The text the history ids already cover (nothing before the first turn,
        # not even the system message).
        before = self._render(st.messages, False) if st.ids else ""
        after = self._render([*st.messages, t.new_message], True)
        if not after.startswith(before):
            raise RuntimeError("the chat template is not prefix-stable")
        new_text = after[len(before) :]
        enc = self.processor(
            text=[new_text],
            audio=t.new_clips or None,
            sampling_rate=SAMPLE_RATE,
            return_tensors="pt",
        )
        new_ids = [int(i) for i in enc["input_ids"][0].tolist()]
        t.prompt_ids = st.ids + new_ids

        cache = st.cache if self.kv_reuse else None
        cached = int(cache.get_seq_length()) if cache is not None else 0
        if cached > len(st.ids) or cached == 0:
            cache, cached = None, 0
        new_starts = self._audio_starts(new_ids, len(st.ids))
        if len(new_starts) != len(t.new_clips) or len(st.clip_starts) != len(st.clips):
            raise RuntimeError("audio placeholders and clips do not match")
        # The clips whose audio tokens the cache has not seen: the new ones,
        # whose features the processor computed (the same call as _features),
        # and history clips when the cache was dropped.
        old = [c for c, s in zip(st.clips, st.clip_starts, strict=True) if s >= cached]
        parts = [self._features(old)] if old else []
        if t.new_clips:
            parts.append((enc["input_features"], enc["feature_attention_mask"]))
        features = None
        if parts:
            features = (
                torch.cat([f for f, _ in parts]).to(self.device, self.dtype),
                torch.cat([m for _, m in parts]).to(self.device),
            )
        t.cached_tokens = cached
        t.new_starts = new_starts
        return _Prep(cache, cached, features)

    def _audio_starts(self, ids: list[int], offset: int) -> list[int]:
        a = self._audio_token_id
        return [offset + i for i, x in enumerate(ids) if x == a and (i == 0 or ids[i - 1] != a)]

    def history_from_messages(
        self, messages: list[dict[str, Any]], clips: list[AudioArray], turns: int
    ) -> History:
        """A History from ChatML messages (system, then user and assistant turns;
        audio items name clips "clip-1", ... in order) and their clips: renders
        and tokenizes them as the turns would have (serve-model rebuilds each
        request's conversation with it). Blocking; call it off the event loop."""
        clips = [np.asarray(c, dtype=np.float32) for c in clips]
        text = self._render(messages, False)
        ids: list[int] = []
        if text:
            enc = self.processor(
                text=[text], audio=clips or None, sampling_rate=SAMPLE_RATE, return_tensors="pt"
            )
            ids = [int(i) for i in enc["input_ids"][0].tolist()]
        starts = self._audio_starts(ids, 0)
        if len(starts) != len(clips):
            raise ValueError("audio items and clips do not match")
        return History(
            messages=[dict(m) for m in messages],
            ids=ids,
            clips=clips,
            clip_starts=starts,
            turns=turns,
        )

    def history_text(self, conversation: Conversation) -> str:
        state = conversation.state
        if not isinstance(state, _ConvState):
            raise ValueError("conversation was not created by this engine")
        return str(self.processor.tokenizer.decode(list(state.ids), skip_special_tokens=False))
