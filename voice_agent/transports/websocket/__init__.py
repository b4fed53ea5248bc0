"""The WebSocket transport: the page, /healthz, /readyz, /metrics and /v1/realtime on one port.

A thin translation on the conversation host (voice_agent/host/): the native
realtime protocol's messages become host calls, host events become its
messages. One job per module:

    app.py         lifecycle and wiring: listen, the handshake hook (HTTP,
                   Origin, admission), one handler per connection, shutdown
    connection.py  one realtime connection: PROTOCOL.md <-> one LiveSession,
                   rate limits, idle close, spoken replies
    http.py        plain HTTP: static files, /healthz, /readyz, /metrics
    access.py      tokens and the handshake's Origin
    outbox.py      the bounded, ordered send queue of one connection
    peer.py        a session's WebRTC peer connection and its reply track
"""

from voice_agent.transports.websocket.access import (
    Access,
    check_token,
    load_tokens,
    origin_allowed,
)
from voice_agent.transports.websocket.app import (
    LIMIT_HELP,
    WebSocketServerApp,
    running_server,
    serve,
)
from voice_agent.transports.websocket.http import (
    READY_TIMEOUT,
    REALTIME_PATH,
    default_web_dir,
    resolve_static,
)

__all__ = [
    "LIMIT_HELP",
    "READY_TIMEOUT",
    "REALTIME_PATH",
    "Access",
    "WebSocketServerApp",
    "check_token",
    "default_web_dir",
    "load_tokens",
    "origin_allowed",
    "resolve_static",
    "running_server",
    "serve",
]
