"""Prefill and decode: the torch forwards of the model, and sampling."""

from __future__ import annotations

from typing import Any

import torch

from voice_agent.engine.base import TurnInput
from voice_agent.engine.kv import DecodeBatch, new_cache, prefill_rows
from voice_agent.engine.qwen2_audio.core import EngineCore
from voice_agent.engine.qwen2_audio.state import _ConvState, _Prefill, _Prep, _Turn


class _Forward(EngineCore):
    """One prefill (alone or batched), one batched decode step, sampling."""

    def _prefill(
        self, t: _Prefill, st: _ConvState, turn: TurnInput, prep: _Prep | None = None
    ) -> None:
        """Encode the new clips and prefill the new ids (one forward, extending the
        conversation's cache in place); sets t's prefill fields."""
        self.stats["prefills"] += 1
        if prep is None:
            prep = self._prepare(t, st, turn)
        cache = prep.cache if prep.cache is not None else new_cache(self.model.config)
        t.cache = cache
        st.cache = cache if self.kv_reuse else None
        logits = self._forward(t.prompt_ids[prep.cached :], prep.cached, cache, prep.features)
        t.next_token = self._sample(logits)

    def _prefill_batch(self, turns: list[_Turn]) -> None:
        """Prefill these prepared turns in ONE model forward (kv.prefill_rows);
        sets each turn's cache (and its conversation's) and first token. Leaves
        nothing changed when it raises."""
        preps: list[_Prep] = []
        for t in turns:
            assert t.prep is not None
            preps.append(t.prep)
        ids = [t.prompt_ids[p.cached :] for t, p in zip(turns, preps, strict=True)]
        features = [p.features for p in preps if p.features is not None]
        kwargs: dict[str, Any] = {}
        if features:  # every row's new clips, in row order
            kwargs["input_features"] = torch.cat([f for f, _ in features])
            kwargs["feature_attention_mask"] = torch.cat([m for _, m in features])
        logits, caches = prefill_rows(
            self.model, ids, [p.cache for p in preps], self._pad_id, **kwargs
        )
        tokens = self._sample_rows(logits)
        for t, cache, tok in zip(turns, caches, tokens, strict=True):
            t.cache, t.next_token = cache, tok
            t.state.cache = cache if self.kv_reuse else None

    def _forward(
        self,
        ids: list[int],
        start: int,
        cache: Any,
        features: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Run `ids` (at positions start..) through the model; logits of the last one."""
        dev = self.device
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)
        position_ids = torch.arange(start, start + len(ids), device=dev).unsqueeze(0)
        kwargs: dict[str, Any] = {}
        if features is not None:
            kwargs["input_features"], kwargs["feature_attention_mask"] = features
        out = self.model.model(
            input_ids=input_ids,
            position_ids=position_ids,
            cache=cache,
            use_cache=True,
            **kwargs,
        )
        hidden = out.last_hidden_state[:, -1, :]
        logits: torch.Tensor = self.model.lm_head(hidden)[0].float()
        return logits

    def _sample(self, logits: torch.Tensor) -> int:
        if len(self._banned_ids):
            logits[..., self._banned_ids.to(logits.device)] = float("-inf")
        if self.temperature <= 0.0:
            return int(torch.argmax(logits).item())
        probs = torch.softmax(logits / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            cum = torch.cumsum(sorted_p, dim=-1)
            drop = cum - sorted_p > self.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_p, 1, generator=self._generator)
            return int(order[choice].item())
        return int(torch.multinomial(probs, 1, generator=self._generator).item())

    def _sample_rows(self, logits: torch.Tensor) -> list[int]:
        """One token per row of [rows, vocab] logits."""
        if self.temperature <= 0.0:
            if len(self._banned_ids):
                logits[:, self._banned_ids.to(logits.device)] = float("-inf")
            return [int(x) for x in torch.argmax(logits, dim=-1).tolist()]
        return [self._sample(row) for row in logits]

    def _decode_batch(self, batch: DecodeBatch, turns: list[_Turn]) -> torch.Tensor:
        """The model step of all decoding turns."""
        return batch.step(self.model, [t.reply[-1] for t in turns])

    def _leave(self, batch: DecodeBatch, turns: list[_Turn]) -> None:
        """Take these turns' rows out of the batch, back into their own caches."""
        rows = [t for t in turns if t.in_batch]
        for t, cache in zip(rows, batch.remove(list(rows)), strict=True):
            t.cache, t.in_batch = cache, False
