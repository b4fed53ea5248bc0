"""The engine interface's data types (pure: no asyncio, no I/O).

What the core (audio, vad, session) and the engines share: the sample rate,
the audio array type, one user turn (TurnInput), what a turn yields (Delta,
TurnResult, Usage, Timing), the conversation handle and its stored History,
the edits of a history (HistoryEdit: DropTurns, TruncateReply, AppendMessage)
and the engine's load figures (EngineStats). engine/base.py re-exports them
next to the asynchronous interface (Engine, TurnHandle).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

SAMPLE_RATE = 16000

AudioArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class Timing:
    queue_ms: float = 0.0
    ttft_ms: float = 0.0
    total_ms: float = 0.0


@dataclass(frozen=True)
class EngineStats:
    """What an engine can tell about its load right now (read at each /metrics
    scrape, never on the hot path). Engines that cannot tell report zeros.

    batch_size: turns decoding together in the current step (batched decode);
    kv_cache_bytes: bytes of KV cache held (decoding turns and idle
    conversations); queued: turns submitted and not started yet."""

    batch_size: int = 0
    kv_cache_bytes: int = 0
    queued: int = 0


@dataclass(frozen=True)
class TurnInput:
    """One user turn. audio: 16 kHz mono float32 in [-1, 1]; text: typed text or
    an instruction about the audio (audio analysis mode). At least one is set."""

    audio: AudioArray | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if self.audio is None and not self.text:
            raise ValueError("a turn needs audio or text")


@dataclass(frozen=True)
class Delta:
    """The next piece of reply text. `tokens` counts reply tokens decoded up to
    and including this piece (what to pass to cancel(keep_tokens=...))."""

    text: str
    tokens: int


@dataclass(frozen=True)
class TurnResult:
    text: str
    usage: Usage
    timing: Timing
    cancelled: bool = False


@dataclass
class Conversation:
    """Handle to one conversation's state inside the engine.

    The engine owns what is inside `state`; callers only keep the handle.
    `turns` counts turns taken (completed turns; a history edit never lowers
    it: the store and host compare it as a revision), `audio_clips` the clips
    in the history.
    """

    conversation_id: str
    system_prompt: str | None
    turns: int = 0
    audio_clips: int = 0
    state: object = field(default=None, repr=False)


@dataclass
class History:
    """A conversation's settled history, for storing it and rebuilding it later
    (voice_agent/store/): ChatML messages (text, with audio items naming their clip),
    the token ids they render to, the audio clips (16 kHz mono float32) and the
    index in `ids` of each clip's first audio token."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    clips: list[AudioArray] = field(default_factory=list)
    clip_starts: list[int] = field(default_factory=list)
    turns: int = 0

    @classmethod
    def of(cls, state: Any, turns: int) -> History:
        """A copy of an engine state's history (its `messages`, `ids`, `clips`
        and `clip_starts` attributes)."""
        return cls(
            messages=[dict(m) for m in state.messages],
            ids=list(state.ids),
            clips=list(state.clips),
            clip_starts=list(state.clip_starts),
            turns=turns,
        )

    def apply(self, conversation: Conversation) -> None:
        """Put this history into a fresh conversation's engine state (the
        engine's own system message stays when the history has none)."""
        state: Any = conversation.state
        if len(self.clips) != len(self.clip_starts):
            raise ValueError("history: clips and clip_starts do not match")
        if self.messages:
            state.messages = [dict(m) for m in self.messages]
        state.ids = list(self.ids)
        state.clips = [np.asarray(c, dtype=np.float32) for c in self.clips]
        state.clip_starts = list(self.clip_starts)
        conversation.turns = self.turns
        conversation.audio_clips = len(self.clips)


@dataclass(frozen=True)
class DropTurns:
    """Drop the last `n` user turns: the n-th last user message and everything
    after it (its reply, later messages); the ids, clips and KV cache are cut
    back to just before it. Nothing to apply (False) when the history has fewer
    than `n` user messages.

    submitted=True: `n` counts the conversation's last n turns SUBMITTED before
    the edit instead, whether or not they entered the history: a turn that left
    nothing there (cancelled before it started, or failed) counts as gone
    already, so nothing older is dropped in its place. Nothing to apply (False)
    when none of them is in the history. (A turn that started and was
    cancelled, or finished, always enters the history, even with an empty
    reply.) For "cancel this reply and forget its turn" when the caller cannot
    know whether the turn had started."""

    n: int = 1
    submitted: bool = False

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("DropTurns needs n >= 1")


@dataclass(frozen=True)
class TruncateReply:
    """Cut the last message, an assistant reply, to its first `keep_tokens`
    reply tokens (0: an empty reply); the ids, message text and KV cache are cut
    to match. Nothing to apply (False) when the last message is not an
    assistant reply or it has fewer than `keep_tokens` tokens."""

    keep_tokens: int

    def __post_init__(self) -> None:
        if self.keep_tokens < 0:
            raise ValueError("TruncateReply needs keep_tokens >= 0")


Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class AppendMessage:
    """Append a text message to the history (its KV cache is prefilled with the
    next turn)."""

    role: Role
    text: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"AppendMessage role must be one of {ROLES}")


HistoryEdit = DropTurns | TruncateReply | AppendMessage
