"""What the Qwen2-Audio engine keeps per conversation and per turn (no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from voice_agent.audio import split_clips as _split_clips
from voice_agent.engine.base import (
    SAMPLE_RATE,
    AudioArray,
    Conversation,
    HistoryEdit,
    QueueTurnHandle,
    TurnInput,
)
from voice_agent.engine.edits import TurnLog
from voice_agent.engine.qwen2_audio.scheduler import QueuedEdit, reserve_tokens

if TYPE_CHECKING:
    import asyncio

    import torch

MAX_CLIP_SECONDS = 30.0  # the encoder's input is 30 s of audio; longer is silently cut
MIN_CLIP_SAMPLES = SAMPLE_RATE // 10  # 0.1 s: at least 2 audio tokens

Message = dict[str, Any]


def split_clips(a: AudioArray, max_seconds: float = MAX_CLIP_SECONDS) -> list[AudioArray]:
    """Cut audio into clips of at most 30 s, each padded to at least 0.1 s."""
    clips = _split_clips(a, max_seconds)
    out: list[AudioArray] = []
    for clip in clips or [np.zeros(0, dtype=np.float32)]:
        c = np.asarray(clip, dtype=np.float32)
        if len(c) < MIN_CLIP_SAMPLES:
            c = np.pad(c, (0, MIN_CLIP_SAMPLES - len(c)))
        out.append(c)
    return out


@dataclass(eq=False)
class _ConvState:
    """What the engine keeps per conversation (in Conversation.state)."""

    messages: list[Message] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    clips: list[AudioArray] = field(default_factory=list)
    clip_starts: list[int] = field(default_factory=list)  # index of each clip's first <|AUDIO|>
    cache: Any = None  # DynamicCache | None
    running: bool = False  # a turn of this conversation is active
    queued: int = 0  # turns submitted and not started yet
    spec: _Spec | None = None  # a speculative prefill of the next turn
    turn_log: TurnLog = field(default_factory=TurnLog)  # for DropTurns(submitted=True)

    def cached_tokens(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    def drop_cache(self) -> None:
        """Rebuilt from the history (ids and clips) at the next turn."""
        self.cache, self.spec = None, None


@dataclass(kw_only=True, eq=False)
class _Prefill:
    """What a prefill leaves: the turn's prompt in the cache and its first token."""

    new_message: Message | None = None
    new_clips: list[AudioArray] = field(default_factory=list)
    new_starts: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    cache: Any = None
    next_token: int = -1


@dataclass(eq=False)
class _Prep:
    """A prepared prefill: what the forward needs besides the turn's fields."""

    cache: Any  # the conversation's cache to extend (DynamicCache), None: start afresh
    cached: int  # tokens in it
    # Log-mel features (and their mask) of the clips whose audio tokens the
    # cache has not seen, in order; None: no such clip.
    features: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(kw_only=True, eq=False)
class _Spec(_Prefill):
    """A speculative prefill: the next turn as if it were `turn`."""

    turn: TurnInput


@dataclass(frozen=True)
class _SpecRequest:
    state: _ConvState
    turn: TurnInput | None  # None: discard


@dataclass(kw_only=True, eq=False)
class _Turn(_Prefill):
    conversation: Conversation
    state: _ConvState
    turn: TurnInput
    handle: QueueTurnHandle
    max_new_tokens: int
    submitted: float
    started: float = 0.0
    first_delta: float = 0.0
    prefilled: bool = False
    speculated: bool = False  # the prefill came from a speculative one
    in_batch: bool = False  # its cache is a row of the decode batch
    prep: _Prep | None = None  # prepared, waiting for a batched prefill with room
    reply: list[int] = field(default_factory=list)
    fed: int = 0  # reply tokens fed to the model (in the cache)
    emitted: str = ""  # reply text sent so far
    emit_from: int = 0  # reply tokens before this index are in `emitted`
    seq: int = -1  # its number in the conversation's turn_log
    logged: bool = False  # its fate is in the conversation's turn_log

    @property
    def cancel_requested(self) -> bool:
        return self.handle.cancel_requested

    def reserve(self) -> int:
        """Cache tokens this turn may need by its end (scheduler.reserve_tokens)."""
        return reserve_tokens(
            prompt_tokens=len(self.prompt_ids) if self.prefilled else None,
            history_tokens=len(self.state.ids),
            audio_samples=None if self.turn.audio is None else len(self.turn.audio),
            text_chars=len(self.turn.text or ""),
            max_new_tokens=self.max_new_tokens,
        )


@dataclass(eq=False)
class _Edit(QueuedEdit):
    """A history edit waiting for its turn (Engine.edit_history)."""

    conversation: Conversation
    state: _ConvState
    edit: HistoryEdit
    future: asyncio.Future[bool]  # on the caller's loop
    upto: int  # the conversation's turns submitted before it (TurnLog.submitted)


_Waiting = _Turn | QueuedEdit  # what waits in the worker's queue: turns and _Edit
