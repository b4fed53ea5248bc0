"""What the translator asks the connection to do on the host (pure data):
each client event becomes GA events and these calls, run in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from voice_agent.engine.types import AppendMessage, AudioArray, HistoryEdit, TurnInput
from voice_agent.session import SessionConfig


@dataclass(frozen=True)
class Start:
    config: SessionConfig
    sample_rate: int
    fresh: bool = False  # a new conversation (the instructions changed before any turn)


@dataclass(frozen=True)
class Feed:
    pcm: bytes  # PCM16 mono at the Start's sample_rate


@dataclass(frozen=True)
class Commit:
    pass


@dataclass(frozen=True)
class Respond:
    turn: TurnInput
    audio: bool  # this response is spoken
    max_output_tokens: int | None


@dataclass(frozen=True)
class Edit:
    """Edit the model's history (engine.edit_history on the session's
    conversation): queued at once, in order with the turns submitted before
    it; the connection does not wait for it."""

    edit: HistoryEdit


@dataclass(frozen=True)
class Aside:
    """An out-of-band response with its own context (response.input): a
    throwaway conversation with `system_prompt`, these messages appended,
    then `turn`; its deltas and end go back through the translator as the
    native events of `reply_id` (t.aside_started first). Never spoken."""

    reply_id: str
    system_prompt: str | None
    messages: tuple[AppendMessage, ...]
    turn: TurnInput
    max_output_tokens: int | None


@dataclass(frozen=True)
class CancelAside:
    reply_id: str


@dataclass(frozen=True)
class Cancel:
    pass


@dataclass(frozen=True)
class StopAudio:
    pass


@dataclass(frozen=True)
class Transcribe:
    """Transcribe a user item's audio (16 kHz) with the model, beside the
    conversation; the result goes to t.transcript / t.transcript_failed."""

    item_id: str
    audio: AudioArray
    language: str | None = None
    prompt: str | None = None


@dataclass(frozen=True)
class Failed:
    """A client event was refused: report `exc` (host.report counts it) and
    send `t.error(exc, event_id)`."""

    exc: BaseException
    event_id: str | None


Call = (
    Start
    | Feed
    | Commit
    | Respond
    | Edit
    | Aside
    | CancelAside
    | Cancel
    | StopAudio
    | Transcribe
    | Failed
)
Out = dict[str, Any] | Call
