"""The attributes every part of the Qwen2-Audio engine shares, declared once.

Qwen2AudioEngine (engine.py) is put together from one mixin per job: loading
(loading.py), prompt building (prompting.py), the model's forwards
(forward.py), speculative prefill (speculative.py), output (output.py),
history edits (editing.py) and the worker loop (worker.py), with the
torch-free decisions in scheduler.py. Each mixin derives from EngineCore,
which names what they share; the methods one mixin calls on another are
declared here for the type checker only.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from voice_agent.engine.base import Delta, QueueTurnHandle, TurnInput
from voice_agent.engine.qwen2_audio.scheduler import Scheduler
from voice_agent.engine.qwen2_audio.state import (
    _ConvState,
    _Edit,
    _Prefill,
    _Prep,
    _SpecRequest,
    _Turn,
    _Waiting,
)

# A test and diagnostics hook (Qwen2AudioEngine.probe): called on the worker
# thread with the point reached and the turn there, if any.
Probe = Callable[[str, TurnInput | None], None]

if TYPE_CHECKING:
    from collections import deque

    import torch

    from voice_agent.engine.base import AudioArray
    from voice_agent.engine.kv import DecodeBatch


class EngineCore:
    """State shared by the engine's parts (set in Qwen2AudioEngine.__init__)."""

    model_name: str
    device_name: str
    dtype_name: str
    max_new_tokens: int
    temperature: float
    top_p: float
    kv_reuse: bool
    seed: int
    demo_model: bool
    local_files_only: bool
    stats: dict[str, int]
    prefill_batch_tokens: int
    prefill_batch_slots: int
    probe: Probe | None

    model: Any  # Qwen2AudioForConditionalGeneration | None
    processor: Any  # Qwen2AudioProcessor | None
    device: torch.device
    dtype: torch.dtype
    _clock: Callable[[], float]
    _sched: Scheduler[_ConvState]
    _stop_ids: set[int]
    _im_end_id: int
    _newline_ids: list[int]
    _audio_token_id: int
    _pad_id: int
    _generator: torch.Generator | None
    _banned_ids: torch.Tensor
    _batch: DecodeBatch | None
    # Deltas of one decode step, delivered together after it (one wake-up per loop).
    _deferred: list[tuple[QueueTurnHandle, Delta]] | None
    _inbox: queue.SimpleQueue[_Turn | _Edit | _SpecRequest | None]

    if TYPE_CHECKING:  # defined by the other parts

        def _prepare(self, t: _Prefill, st: _ConvState, turn: TurnInput) -> _Prep: ...
        def _render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str: ...
        def _audio_starts(self, ids: list[int], offset: int) -> list[int]: ...
        def _features(self, clips: list[AudioArray]) -> tuple[torch.Tensor, torch.Tensor]: ...
        def _prefill(
            self, t: _Prefill, st: _ConvState, turn: TurnInput, prep: _Prep | None = None
        ) -> None: ...
        def _prefill_batch(self, turns: list[_Turn]) -> None: ...
        def _sample_rows(self, logits: torch.Tensor) -> list[int]: ...
        def _decode_batch(self, batch: DecodeBatch, turns: list[_Turn]) -> torch.Tensor: ...
        def _leave(self, batch: DecodeBatch, turns: list[_Turn]) -> None: ...
        def _adopt_spec(self, t: _Turn) -> bool: ...
        def _discard_spec(self, st: _ConvState) -> None: ...
        def _speculate_one(
            self, specs: deque[_SpecRequest], waiting: deque[_Waiting], active: list[_Turn]
        ) -> None: ...
        def _emit(self, t: _Turn) -> None: ...
        def _decode_text(self, ids: list[int]) -> str: ...
        def _finish(self, t: _Turn, cancelled: bool) -> None: ...
        def _finish_cancel(self, t: _Turn) -> None: ...
        def _drop_unstarted(self, t: _Turn) -> None: ...
        def _fail(self, t: _Turn) -> None: ...
        def _touch(self, st: _ConvState) -> None: ...
        def _enforce_budget(self, batch: DecodeBatch, active: list[_Turn]) -> None: ...
        def _setup_tokens(self) -> None: ...
        def _apply_edit(self, e: _Edit) -> None: ...
