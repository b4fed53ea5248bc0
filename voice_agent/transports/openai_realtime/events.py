"""GA client events parsed and validated into typed requests, and the GA
`error` event (pure).

`parse(text)` -> one request dataclass, or raises errors.InvalidField /
errors.Unsupported / errors.BadMessage (the translator answers with
`error_event`, whose `code` comes from errors.to_wire, the one mapping, and
whose `event_id` is the client event's). Unknown event types are refused;
unknown fields of known events are refused like OpenAI does ("unknown
parameter"), and features this server does not offer are refused by name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from voice_agent.errors import BadMessage, InvalidField, Unsupported, to_wire
from voice_agent.transports.openai_realtime.settings import refuse_tools


@dataclass(frozen=True)
class SessionUpdate:
    event_id: str | None
    session: Any  # validated by settings.update


@dataclass(frozen=True)
class AudioAppend:
    event_id: str | None
    audio: str  # base64, decoded by the translator (it knows the format)


@dataclass(frozen=True)
class AudioCommit:
    event_id: str | None


@dataclass(frozen=True)
class AudioClear:
    event_id: str | None


@dataclass(frozen=True)
class ItemIn:
    """A message item a client creates."""

    id: str | None
    role: str  # "user" | "assistant" | "system"
    texts: tuple[str, ...] = ()
    audio: tuple[str, ...] = ()  # base64 input_audio parts


@dataclass(frozen=True)
class ItemRef:
    """An item_reference in response.input: an item of the conversation."""

    id: str


@dataclass(frozen=True)
class ItemCreate:
    event_id: str | None
    item: ItemIn
    previous_item_id: str | None = None


@dataclass(frozen=True)
class ItemRetrieve:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ItemDelete:
    event_id: str | None
    item_id: str


@dataclass(frozen=True)
class ItemTruncate:
    event_id: str | None
    item_id: str
    content_index: int
    audio_end_ms: int


@dataclass(frozen=True)
class ResponseCreate:
    event_id: str | None
    output_modalities: tuple[str, ...] | None = None
    max_output_tokens: int | None = None
    max_tokens_set: bool = False
    metadata: dict[str, Any] | None = None
    instructions: str | None = None
    conversation: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict)
    input: tuple[ItemIn | ItemRef, ...] | None = None  # its own context (out-of-band)


@dataclass(frozen=True)
class ResponseCancel:
    event_id: str | None
    response_id: str | None = None


@dataclass(frozen=True)
class OutputAudioClear:
    event_id: str | None


Request = (
    SessionUpdate
    | AudioAppend
    | AudioCommit
    | AudioClear
    | ItemCreate
    | ItemRetrieve
    | ItemDelete
    | ItemTruncate
    | ResponseCreate
    | ResponseCancel
    | OutputAudioClear
)

# The GA client events this server refuses as a whole (with what they are).
REFUSED = {
    "session.close": "session.close",
    "transcription_session.update": "transcription sessions",
    "output_audio_buffer.dtmf": "DTMF",
}


def event_id_of(text: str | bytes) -> str | None:
    """The client event's `event_id` when the text is a JSON object with one
    (for an `error` about a malformed event)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    value = obj.get("event_id") if isinstance(obj, dict) else None
    return value if isinstance(value, str) else None


def _str(obj: dict[str, Any], key: str, param: str, *, optional: bool = False) -> Any:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise InvalidField(f"{param} must be a string", param)
    return value


def _int(obj: dict[str, Any], key: str, param: str) -> int:
    value = obj.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidField(f"{param} must be a non-negative integer", param)
    return value


def _only(obj: dict[str, Any], known: set[str], param: str) -> None:
    for key in obj:
        if key not in known:
            where = f"{param}.{key}" if param else key
            raise InvalidField(f"unknown parameter '{where}'", where)


def _item(obj: Any) -> ItemIn:
    p = "item"
    if not isinstance(obj, dict):
        raise InvalidField("item must be an object", p)
    kind = obj.get("type", "message")
    if kind in ("function_call", "function_call_output"):
        raise Unsupported("function calls are not supported", "item.type")
    if isinstance(kind, str) and kind.startswith("mcp_"):
        raise Unsupported("MCP items are not supported", "item.type")
    if kind != "message":
        raise InvalidField("item.type must be message", "item.type")
    _only(obj, {"id", "type", "object", "role", "content", "status"}, p)
    role = obj.get("role")
    if role not in ("user", "assistant", "system"):
        raise InvalidField("item.role must be user, assistant or system", "item.role")
    content = obj.get("content")
    if not isinstance(content, list):
        raise InvalidField("item.content must be an array", "item.content")
    texts: list[str] = []
    audio: list[str] = []
    for i, part in enumerate(content):
        pp = f"item.content[{i}]"
        if not isinstance(part, dict):
            raise InvalidField(f"{pp} must be an object", pp)
        ptype = part.get("type")
        if ptype == "input_image":
            raise Unsupported("images are not supported", f"{pp}.type")
        if ptype in ("input_text", "text", "output_text"):
            texts.append(_str(part, "text", f"{pp}.text"))
        elif ptype == "input_audio":
            if role != "user":
                raise InvalidField(f"{pp}: input_audio is for user messages", f"{pp}.type")
            if part.get("audio") is None:
                raise Unsupported("input_audio without audio is not supported", f"{pp}.audio")
            audio.append(_str(part, "audio", f"{pp}.audio"))
        elif ptype == "output_audio":
            raise Unsupported("assistant audio items are not supported", f"{pp}.type")
        else:
            raise InvalidField(f"{pp}.type is not a known content type", f"{pp}.type")
    if not texts and not audio:
        raise InvalidField("item.content is empty", "item.content")
    return ItemIn(_str(obj, "id", "item.id", optional=True), role, tuple(texts), tuple(audio))


def _response(event_id: str | None, obj: Any) -> ResponseCreate:
    if obj is None:
        return ResponseCreate(event_id)
    p = "response"
    if not isinstance(obj, dict):
        raise InvalidField("response must be an object", p)
    _only(
        obj,
        {
            "output_modalities",
            "max_output_tokens",
            "metadata",
            "instructions",
            "conversation",
            "tools",
            "tool_choice",
            "input",
            "audio",
            "prompt",
        },
        p,
    )
    refuse_tools(obj, p)
    conversation = obj.get("conversation", "auto")
    if conversation not in ("auto", "none"):
        raise InvalidField("response.conversation must be auto or none", "response.conversation")
    inputs = _inputs(obj.get("input"))
    if inputs is not None and conversation != "none":
        raise Unsupported(
            'response.input with conversation "auto" is not supported (its own context, its '
            'reply joining the conversation): use conversation "none"',
            "response.input",
        )
    modalities = obj.get("output_modalities")
    if modalities is not None and (
        not isinstance(modalities, list)
        or len(modalities) != 1
        or modalities[0] not in ("text", "audio")
    ):
        p = "response.output_modalities"
        raise InvalidField(f'{p} must be ["text"] or ["audio"]', p)
    tokens = obj.get("max_output_tokens")
    if (
        tokens is not None
        and tokens != "inf"
        and (isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= 4096)
    ):
        p = "response.max_output_tokens"
        raise InvalidField(f'{p} must be 1 to 4096 or "inf"', p)
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise InvalidField("response.metadata must be an object", "response.metadata")
    return ResponseCreate(
        event_id,
        output_modalities=None if modalities is None else (modalities[0],),
        max_output_tokens=tokens if isinstance(tokens, int) else None,
        max_tokens_set="max_output_tokens" in obj,
        metadata=metadata,
        instructions=_str(obj, "instructions", "response.instructions", optional=True),
        conversation=conversation,
        extra={"audio": obj["audio"]} if "audio" in obj else {},
        input=inputs,
    )


def _inputs(value: Any) -> tuple[ItemIn | ItemRef, ...] | None:
    """response.input: messages and item_references (None: not given)."""
    if value is None:
        return None
    p = "response.input"
    if not isinstance(value, list):
        raise InvalidField(f"{p} must be an array", p)
    out: list[ItemIn | ItemRef] = []
    for i, obj in enumerate(value):
        if isinstance(obj, dict) and obj.get("type") == "item_reference":
            _only(obj, {"type", "id"}, f"{p}[{i}]")
            out.append(ItemRef(_str(obj, "id", f"{p}[{i}].id")))
        else:
            out.append(_item(obj))
    return tuple(out)


def parse(text: str | bytes) -> Request:
    """One client text frame -> a request (see the module doc)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError, UnicodeDecodeError):
        raise BadMessage("the event is not valid JSON") from None
    if not isinstance(obj, dict):
        raise BadMessage("an event must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise InvalidField("the event has no string 'type'", "type")
    event_id = obj.get("event_id")
    if event_id is not None and not isinstance(event_id, str):
        raise InvalidField("event_id must be a string", "event_id")
    if kind in REFUSED:
        raise Unsupported(f"{REFUSED[kind]} is not supported", "type")
    if kind == "session.update":
        _only(obj, {"type", "event_id", "session"}, "")
        return SessionUpdate(event_id, obj.get("session"))  # settings.update validates it
    if kind == "input_audio_buffer.append":
        _only(obj, {"type", "event_id", "audio"}, "")
        return AudioAppend(event_id, _str(obj, "audio", "audio"))
    if kind == "input_audio_buffer.commit":
        return AudioCommit(event_id)
    if kind == "input_audio_buffer.clear":
        return AudioClear(event_id)
    if kind == "output_audio_buffer.clear":
        return OutputAudioClear(event_id)
    if kind == "conversation.item.create":
        _only(obj, {"type", "event_id", "item", "previous_item_id"}, "")
        previous = _str(obj, "previous_item_id", "previous_item_id", optional=True)
        return ItemCreate(event_id, _item(obj.get("item")), previous)
    if kind in ("conversation.item.retrieve", "conversation.item.delete"):
        _only(obj, {"type", "event_id", "item_id"}, "")
        item_id = _str(obj, "item_id", "item_id")
        cls = ItemRetrieve if kind.endswith("retrieve") else ItemDelete
        return cls(event_id, item_id)
    if kind == "conversation.item.truncate":
        _only(obj, {"type", "event_id", "item_id", "content_index", "audio_end_ms"}, "")
        return ItemTruncate(
            event_id,
            _str(obj, "item_id", "item_id"),
            _int(obj, "content_index", "content_index"),
            _int(obj, "audio_end_ms", "audio_end_ms"),
        )
    if kind == "response.create":
        _only(obj, {"type", "event_id", "response"}, "")
        return _response(event_id, obj.get("response"))
    if kind == "response.cancel":
        _only(obj, {"type", "event_id", "response_id"}, "")
        return ResponseCancel(event_id, _str(obj, "response_id", "response_id", optional=True))
    raise InvalidField(f"unknown event type {kind[:60]!r}", "type")


def error_body(exc: BaseException, event_id: str | None) -> dict[str, Any]:
    """The `error` object of a GA error event: code and message through
    errors.to_wire (the one mapping); `type` invalid_request_error for what
    the client got wrong, server_error otherwise."""
    wire = to_wire(exc)
    kind = "server_error" if wire.code in ("internal", "busy") else "invalid_request_error"
    param = getattr(exc, "param", None) if isinstance(exc, InvalidField) else None
    return {
        "type": kind,
        "code": wire.code,
        "message": wire.message,
        "param": param,
        "event_id": event_id,
    }
