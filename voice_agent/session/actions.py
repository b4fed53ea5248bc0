"""What a Session returns (the actions its driver executes) and what it
records (HistoryEntry); see the package doc (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from voice_agent.engine.types import AudioArray, HistoryEdit, TurnInput
from voice_agent.protocol import ServerEvent


@dataclass(frozen=True)
class Send:
    event: ServerEvent


@dataclass(frozen=True)
class SubmitTurn:
    reply_id: str
    utterance_id: str | None
    turn: TurnInput


@dataclass(frozen=True)
class CancelTurn:
    reply_id: str
    keep_tokens: int
    reason: str  # "barge_in" | "client" | "continued"


@dataclass(frozen=True)
class EditHistory:
    """Edit the engine conversation's history (engine.edit_history): queued
    in order with the turns submitted before it (a continued reply's turn is
    dropped once its cancel has settled)."""

    edit: HistoryEdit


@dataclass(frozen=True)
class Speculate:
    """Prefill this audio as the next turn ahead of time (the VAD hangover is
    running and the engine would start this turn at once). The engine uses it
    only if the turn's audio turns out to be exactly these samples."""

    audio: AudioArray


@dataclass(frozen=True)
class DetectTurn:
    """Run the end-of-turn detector on `audio` (the utterance so far, at most
    8 s, silence included) and call on_turn_decision(utterance_id, check, p,
    silence_ms)."""

    utterance_id: int
    check: int
    audio: AudioArray
    silence_ms: int = 0  # silence at the end of `audio` (which threshold applies)


@dataclass(frozen=True)
class StopAudio:
    """Stop the spoken audio of `reply_id`, whose text is already done."""

    reply_id: str
    reason: str  # "barge_in" | "continued"


Action = Send | SubmitTurn | CancelTurn | EditHistory | Speculate | DetectTurn | StopAudio


@dataclass(frozen=True)
class HistoryEntry:
    role: Literal["user", "assistant"]
    text: str | None  # typed text or reply text; None for a spoken user turn
    audio_ms: int | None  # duration of the user's clip; None for text
    utterance_id: str | None
    reply_id: str | None
    cancelled: bool = False
