"""Speculative prefill: the utterance so far, prefilled during the VAD hangover;
the real turn takes it over when its audio is the same samples."""

from __future__ import annotations

import logging
from collections import deque

import numpy as np

from voice_agent.engine.qwen2_audio.core import EngineCore
from voice_agent.engine.qwen2_audio.state import _ConvState, _Spec, _SpecRequest, _Turn, _Waiting

logger = logging.getLogger("voice_agent.engine")


class _Speculation(EngineCore):
    """Serve, discard and adopt speculative prefills."""

    def _speculate_one(
        self, specs: deque[_SpecRequest], waiting: deque[_Waiting], active: list[_Turn]
    ) -> None:
        """Serve the oldest speculative request whose conversation is idle."""
        while specs:
            req = specs.popleft()
            st = req.state
            if st.running or st.queued:
                continue  # the real turn is here already: nothing to gain
            self._discard_spec(st)
            if req.turn is None:
                continue
            spec = _Spec(turn=req.turn)
            try:
                self._prefill(spec, st, req.turn)
            except Exception:
                logger.exception("speculative prefill failed")
                st.drop_cache()
                return
            st.spec = spec
            self._touch(st)
            if self._batch is not None:
                self._enforce_budget(self._batch, active)
            return

    def _discard_spec(self, st: _ConvState) -> None:
        """Drop a speculative prefill: crop the cache back to the history."""
        spec, st.spec = st.spec, None
        if spec is None:
            return
        cache = st.cache
        if cache is not None and cache is spec.cache:
            extra = int(cache.get_seq_length()) - len(st.ids)
            if extra > 0:
                cache.crop(-extra)

    def _adopt_spec(self, t: _Turn) -> bool:
        """Take over the conversation's speculative prefill if it is this turn."""
        st = t.state
        spec = st.spec
        if spec is None:
            return False
        a, b = spec.turn.audio, t.turn.audio
        same = (
            a is not None
            and b is not None
            and spec.turn.text == t.turn.text
            and a.shape == b.shape
            and bool(np.array_equal(a, b))
        )
        if not same:
            self.stats["speculative_misses"] += 1
            self._discard_spec(st)
            return False
        st.spec = None
        for name in (
            "new_message",
            "new_clips",
            "new_starts",
            "prompt_ids",
            "cached_tokens",
            "cache",
            "next_token",
        ):
            setattr(t, name, getattr(spec, name))
        t.speculated = True
        self.stats["speculative_hits"] += 1
        return True
