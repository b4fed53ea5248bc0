"""The wire contract (../shared/PROTOCOL.md) as typed events and a JSON codec (pure).

Every message is a frozen dataclass whose ClassVar `type` is its wire name.
`decode_client` is strict: anything a client gets wrong raises errors.BadMessage
(or errors.BadAudio for an unsupported rate or channel count) with a message
naming the field; unknown extra fields are ignored (forward compatible).
`decode_server` is tolerant (for clients and tests): unknown fields are
ignored and unknown types become `UnknownEvent`. `encode` writes compact JSON
and leaves out optional fields that are None (`reply.started` always carries
`utterance_id`, null for a text turn). Ids on the wire are strings, numbered
per session: utterances "u1", "u2"...; replies "r1", "r2"...

Additions to PROTOCOL.md (additive, optional): `error` may carry `reply_id`
when the error ends that reply (the turn failed or was dropped); the client
message `session.update` (`speak`: spoken replies on or off mid-session).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar, Union

from voice_agent.audio import MAX_RATE, MIN_RATE
from voice_agent.errors import BadAudio, BadMessage, to_wire

FORMATS = ("pcm16",)

JsonValue = str | int | float | bool | None


def utterance_wire_id(n: int) -> str:
    """The wire id of the session's n-th utterance: "u<n>"."""
    return f"u{n}"


def reply_wire_id(n: int) -> str:
    """The wire id of the session's n-th reply: "r<n>"."""
    return f"r{n}"


# --------------------------------------------------------------- client -> server


@dataclass(frozen=True)
class SessionStart:
    type: ClassVar[str] = "session.start"
    sample_rate: int = 16000
    channels: int = 1
    format: str = "pcm16"
    session_id: str | None = None
    token: str | None = None
    system_prompt: str | None = None
    device: str | None = None
    speak: bool | None = None
    output_sample_rate: int = 16000


@dataclass(frozen=True)
class TextTurn:
    type: ClassVar[str] = "text"
    text: str


@dataclass(frozen=True)
class AudioCommit:
    type: ClassVar[str] = "audio.commit"


@dataclass(frozen=True)
class CancelReply:
    type: ClassVar[str] = "cancel"


@dataclass(frozen=True)
class WebRTCOffer:
    type: ClassVar[str] = "webrtc.offer"
    sdp: str


@dataclass(frozen=True)
class Playback:
    type: ClassVar[str] = "playback"
    reply_id: str
    played_ms: int  # a JSON float is accepted and rounded (browsers measure in float ms)


@dataclass(frozen=True)
class SessionUpdate:
    """Change a started session's settings; today only `speak` (spoken replies
    on or off from now on: off also stops the audio of the reply speaking)."""

    type: ClassVar[str] = "session.update"
    speak: bool


ClientEvent = (
    SessionStart | TextTurn | AudioCommit | CancelReply | WebRTCOffer | Playback | SessionUpdate
)

# --------------------------------------------------------------- server -> client


@dataclass(frozen=True)
class SessionStarted:
    type: ClassVar[str] = "session.started"
    session_id: str
    model: str
    demo_model: bool
    sample_rate: int


@dataclass(frozen=True)
class SpeechStartedEvent:
    type: ClassVar[str] = "speech.started"
    utterance_id: str
    start_ms: int


@dataclass(frozen=True)
class SpeechStoppedEvent:
    type: ClassVar[str] = "speech.stopped"
    utterance_id: str
    start_ms: int
    end_ms: int
    reason: str | None = None  # "end_of_turn" | "silence" | "max_length" | "commit"
    eot_probability: float | None = None
    continues: str | None = None  # the utterance this one was joined to (continuation)


@dataclass(frozen=True)
class ReplyStarted:
    type: ClassVar[str] = "reply.started"
    reply_id: str
    utterance_id: str | None  # None (JSON null) for a text turn; always on the wire


@dataclass(frozen=True)
class ReplyDelta:
    type: ClassVar[str] = "reply.delta"
    reply_id: str
    text: str


@dataclass(frozen=True)
class ReplyDone:
    type: ClassVar[str] = "reply.done"
    reply_id: str
    text: str
    usage: dict[str, int]  # prompt_tokens, cached_tokens, completion_tokens
    timing: dict[str, float]  # queue_ms, ttft_ms, total_ms


@dataclass(frozen=True)
class ReplyCancelled:
    type: ClassVar[str] = "reply.cancelled"
    reply_id: str
    reason: str  # "barge_in" | "client" | "continued"
    text: str


@dataclass(frozen=True)
class CommandEvent:
    type: ClassVar[str] = "command"
    action: str
    target: str
    value: JsonValue = None


@dataclass(frozen=True)
class WebRTCAnswer:
    type: ClassVar[str] = "webrtc.answer"
    sdp: str


@dataclass(frozen=True)
class ErrorEvent:
    type: ClassVar[str] = "error"
    code: str
    message: str
    reply_id: str | None = None  # additive: set when the error ends that reply


@dataclass(frozen=True)
class ReplyAudioStarted:
    type: ClassVar[str] = "reply.audio.started"
    reply_id: str
    sample_rate: int


@dataclass(frozen=True)
class ReplyAudioDone:
    type: ClassVar[str] = "reply.audio.done"
    reply_id: str
    duration_ms: int
    cancelled: bool


@dataclass(frozen=True)
class UnknownEvent:
    """A server event of a type this version does not know (decode_server only)."""

    type: str
    data: dict[str, Any]


ServerEvent = (
    SessionStarted
    | SpeechStartedEvent
    | SpeechStoppedEvent
    | ReplyStarted
    | ReplyDelta
    | ReplyDone
    | ReplyCancelled
    | CommandEvent
    | WebRTCAnswer
    | ErrorEvent
    | ReplyAudioStarted
    | ReplyAudioDone
    | UnknownEvent
)

CLIENT_EVENTS: dict[str, type[ClientEvent]] = {
    c.type: c
    for c in (
        SessionStart,
        TextTurn,
        AudioCommit,
        CancelReply,
        WebRTCOffer,
        Playback,
        SessionUpdate,
    )
}
SERVER_EVENTS: dict[str, type[ServerEvent]] = {
    c.type: c
    for c in (
        SessionStarted,
        SpeechStartedEvent,
        SpeechStoppedEvent,
        ReplyStarted,
        ReplyDelta,
        ReplyDone,
        ReplyCancelled,
        CommandEvent,
        WebRTCAnswer,
        ErrorEvent,
        ReplyAudioStarted,
        ReplyAudioDone,
    )
}

# ------------------------------------------------------------------------ codec


def encode(event: ClientEvent | ServerEvent) -> str:
    """Compact JSON with `type` first; optional fields that are None are left out."""
    if isinstance(event, UnknownEvent):
        return _dumps({**event.data, "type": event.type})
    out: dict[str, Any] = {"type": event.type}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if value is None and f.default is None:
            continue  # optional and unset
        out[f.name] = value
    return _dumps(out)


def decode_client(data: str | bytes) -> ClientEvent:
    """Parse one client text frame strictly (BadMessage / BadAudio, see module doc)."""
    obj = _load(data)
    kind = _type_of(obj)
    cls = CLIENT_EVENTS.get(kind)
    if cls is None:
        raise BadMessage(f"unknown message type {_short(kind)}")
    event = _build(cls, obj, strict=True)
    if isinstance(event, SessionStart):
        _check_session_start(event)
    return event


def decode_server(data: str | bytes) -> ServerEvent:
    """Parse one server text frame; unknown types become UnknownEvent.

    Known types still need their required fields with the right JSON types
    (BadMessage otherwise); unknown fields are ignored.
    """
    obj = _load(data)
    kind = _type_of(obj)
    cls = SERVER_EVENTS.get(kind)
    if cls is None:
        return UnknownEvent(kind, {k: v for k, v in obj.items() if k != "type"})
    return _build(cls, obj, strict=False)


def error_event(exc: BaseException, reply_id: str | None = None) -> ErrorEvent:
    """The `error` event for any exception, through errors.to_wire (the one mapping):
    a plain exception becomes `internal` with a generic message, never its text."""
    wire = to_wire(exc)
    return ErrorEvent(wire.code, wire.message, reply_id)


# ----------------------------------------------------------------------- helpers

_E = TypeVar("_E")
_HINTS: dict[type, dict[str, Any]] = {}
# int fields where a finite JSON float is accepted and rounded (browsers measure in float ms)
_FLOAT_MS = {("playback", "played_ms")}


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _load(data: str | bytes) -> dict[str, Any]:
    if isinstance(data, bytes | bytearray):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise BadMessage("message is not valid UTF-8") from None
    try:
        obj = json.loads(data)
    except (ValueError, RecursionError):
        raise BadMessage("message is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadMessage(f"message must be a JSON object, got {_json_kind(obj)}")
    return obj


def _type_of(obj: dict[str, Any]) -> str:
    if "type" not in obj:
        raise BadMessage("message has no 'type' field")
    kind = obj["type"]
    if not isinstance(kind, str):
        raise BadMessage(f"field 'type' must be a string, got {_json_kind(kind)}")
    return kind


def _hints(cls: type) -> dict[str, Any]:
    hints = _HINTS.get(cls)
    if hints is None:
        hints = typing.get_type_hints(cls)
        _HINTS[cls] = hints
    return hints


def _build(cls: type[_E], obj: dict[str, Any], strict: bool) -> _E:
    hints = _hints(cls)
    kind: str = getattr(cls, "type")  # noqa: B009 (a ClassVar on every event class)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in obj:
            if f.default is dataclasses.MISSING:
                raise BadMessage(f"{kind}: missing field '{f.name}'")
            continue
        value = obj[f.name]
        hint = hints[f.name]
        if (kind, f.name) in _FLOAT_MS and isinstance(value, float) and math.isfinite(value):
            value = round(value)
        if not _matches(value, hint):
            raise BadMessage(
                f"{kind}: field '{f.name}' must be {_describe(hint)}, got {_json_kind(value)}"
            )
        kwargs[f.name] = _coerce(value, hint)
    if strict and cls is Playback and kwargs["played_ms"] < 0:
        raise BadMessage("playback: field 'played_ms' must not be negative")
    return cls(**kwargs)


def _args(hint: Any) -> tuple[Any, ...]:
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        return typing.get_args(hint)
    return (hint,)


def _matches(value: Any, hint: Any) -> bool:
    return any(_matches_one(value, t) for t in _args(hint))


def _matches_one(value: Any, t: Any) -> bool:
    if t is Any:
        return True
    if t is type(None):
        return value is None
    if t is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False  # bool is not a number on the wire
    if t is int:
        return isinstance(value, int)
    if t is float:
        return isinstance(value, int | float)
    if t is str:
        return isinstance(value, str)
    if (typing.get_origin(t) or t) is dict:
        return isinstance(value, dict)
    return False


def _coerce(value: Any, hint: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and _args(hint)[0] is float:
        return float(value)
    return value


_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}


def _describe(hint: Any) -> str:
    parts = []
    for t in _args(hint):
        if t is type(None):
            parts.append("null")
        elif (typing.get_origin(t) or t) is dict:
            parts.append("an object")
        else:
            parts.append(_NAMES.get(t, "a value"))
    return " or ".join(parts)


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _short(s: str, limit: int = 40) -> str:
    return repr(s if len(s) <= limit else s[:limit] + "...")


def _check_session_start(e: SessionStart) -> None:
    if e.format not in FORMATS:
        raise BadMessage(f"session.start: unknown format {_short(e.format)} (use 'pcm16')")
    for name, rate in (
        ("sample_rate", e.sample_rate),
        ("output_sample_rate", e.output_sample_rate),
    ):
        if not MIN_RATE <= rate <= MAX_RATE:
            raise BadAudio(f"unsupported {name} {rate} Hz (use {MIN_RATE} to {MAX_RATE})")
    if e.channels not in (1, 2):
        raise BadAudio(f"unsupported channel count {e.channels} (use 1 or 2)")
