"""MQTT requests: parsing a payload into a Request, and the ids already answered."""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from voice_agent.errors import BadAudio, BadMessage, VoiceAgentError

MAX_ID_CHARS = 128
# Remembered ids: enough for a device's retries of its recent requests, bounded
# so that a client inventing device names cannot grow memory.
ANSWERED_PER_DEVICE = 256
MAX_DEVICES_TRACKED = 1024
_SESSION = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True)
class Request:
    id: str
    device: str
    text: str | None = None
    audio: bytes | None = field(default=None, repr=False)
    session: str | None = None
    received: float = 0.0


class RequestError(Exception):
    """A request that cannot be served: the error to publish and the id, if known."""

    def __init__(self, error: VoiceAgentError, request_id: str | None) -> None:
        super().__init__(error.code)
        self.error = error
        self.request_id = request_id


def parse_request(
    device: str, kind: str, payload: bytes, *, max_text_chars: int, received: float = 0.0
) -> Request:
    """A request from its topic kind and payload; RequestError when malformed."""
    if kind == "ask/audio":
        rid = uuid.uuid4().hex
        if not payload:
            raise RequestError(BadAudio("audio is empty"), rid)
        return Request(rid, device, audio=payload, received=received)
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RequestError(BadMessage("payload is not valid JSON"), None) from None
    if not isinstance(obj, dict):
        raise RequestError(BadMessage("payload must be a JSON object"), None)
    raw_id: Any = obj.get("id")
    if not isinstance(raw_id, str) or not 1 <= len(raw_id) <= MAX_ID_CHARS:
        raise RequestError(BadMessage(f"'id' must be a string of 1 to {MAX_ID_CHARS} chars"), None)
    rid = raw_id
    text, audio_b64, session = obj.get("text"), obj.get("audio"), obj.get("session")
    if text is not None and not isinstance(text, str):
        raise RequestError(BadMessage("'text' must be a string"), rid)
    if audio_b64 is not None and not isinstance(audio_b64, str):
        raise RequestError(BadMessage("'audio' must be a base64 string"), rid)
    if session is not None and (not isinstance(session, str) or not _SESSION.fullmatch(session)):
        raise RequestError(BadMessage("'session' must match [A-Za-z0-9_.:-]{1,64}"), rid)
    if text is not None and len(text) > max_text_chars:
        raise RequestError(BadMessage(f"text is longer than {max_text_chars} characters"), rid)
    if not (text and text.strip()) and not audio_b64:
        raise RequestError(BadMessage("a request needs 'text' or 'audio'"), rid)
    audio: bytes | None = None
    if audio_b64:
        try:
            audio = base64.b64decode(audio_b64, validate=True)
        except (binascii.Error, ValueError):
            raise RequestError(BadAudio("'audio' is not valid base64"), rid) from None
        if not audio:
            raise RequestError(BadAudio("audio is empty"), rid)
    clean_text = text if text and text.strip() else None
    return Request(rid, device, clean_text, audio, session, received)


class AnsweredIds:
    """Request ids already taken, per device: bounded LRU on both levels."""

    def __init__(
        self, per_device: int = ANSWERED_PER_DEVICE, devices: int = MAX_DEVICES_TRACKED
    ) -> None:
        self.per_device = per_device
        self.max_devices = devices
        self._ids: OrderedDict[str, OrderedDict[str, None]] = OrderedDict()

    def __contains__(self, key: tuple[str, str]) -> bool:
        device, rid = key
        ids = self._ids.get(device)
        return ids is not None and rid in ids

    def add(self, device: str, rid: str) -> None:
        ids = self._ids.get(device)
        if ids is None:
            ids = self._ids[device] = OrderedDict()
            while len(self._ids) > self.max_devices:
                self._ids.popitem(last=False)
        self._ids.move_to_end(device)
        ids[rid] = None
        ids.move_to_end(rid)
        while len(ids) > self.per_device:
            ids.popitem(last=False)

    def discard(self, device: str, rid: str) -> None:
        ids = self._ids.get(device)
        if ids is not None:
            ids.pop(rid, None)
