"""Which WebSocket speaks the OpenAI Realtime protocol, and its key (pure).

The rule (docs/openai-realtime.md): a WebSocket to /v1/realtime WITH a
`model` query parameter speaks the OpenAI Realtime GA protocol (the openai
SDK, Pipecat and LiveKit build `ws://HOST:PORT/v1/realtime?model=NAME` from
base_url "http://HOST:PORT/v1"); WITHOUT one, the native protocol (the page,
`voice-agent client` and speakers never send `model`). The key comes as
`Authorization: Bearer KEY` or, from browsers, as the subprotocol
`openai-insecure-api-key.KEY`; it is checked like the native token
(access.check_token: constant time, --token/--tokens-file); a wrong key is
refused at the handshake with HTTP 401.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs, urlsplit

REALTIME_PATH = "/v1/realtime"
KEY_PROTOCOL = "openai-insecure-api-key."
SUBPROTOCOL = "realtime"


def is_openai(path: str) -> bool:
    """True for /v1/realtime?model=... (the OpenAI protocol)."""
    url = urlsplit(path)
    return url.path == REALTIME_PATH and "model" in parse_qs(url.query, keep_blank_values=True)


def requested_model(ws: object) -> str | None:
    """The `model` query parameter of a connection's handshake (echoed as
    session.model: the engine's own name can be a server path)."""
    request = getattr(ws, "request", None)
    path = getattr(request, "path", None)
    if not isinstance(path, str):
        return None
    values = parse_qs(urlsplit(path).query).get("model")
    return values[0][:200] if values else None


def offered_subprotocols(headers: Mapping[str, str] | object) -> list[str]:
    """The Sec-WebSocket-Protocol values a handshake offers."""
    get_all = getattr(headers, "get_all", None)
    values = get_all("Sec-WebSocket-Protocol") if get_all is not None else []
    out: list[str] = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out


def api_key(headers: Mapping[str, str] | object) -> str | None:
    """The key of a handshake: the Bearer token, else the key subprotocol."""
    get = getattr(headers, "get", None)
    auth = get("Authorization") if get is not None else None
    if isinstance(auth, str):
        scheme, _, token = auth.strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    for proto in offered_subprotocols(headers):
        if proto.startswith(KEY_PROTOCOL) and len(proto) > len(KEY_PROTOCOL):
            return proto[len(KEY_PROTOCOL) :]
    return None


def select_subprotocol(offered: Sequence[str]) -> str | None:
    """`realtime` when offered; else an offered key subprotocol (a browser
    fails a handshake that selects none of what it offered); else none."""
    if SUBPROTOCOL in offered:
        return SUBPROTOCOL
    return next((p for p in offered if p.startswith("openai-")), None)
