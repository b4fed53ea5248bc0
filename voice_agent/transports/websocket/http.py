"""Plain HTTP on the WebSocket port: the page's static files, /healthz, /readyz, /metrics.

Answered from the handshake's request (the server's `process_request`);
`/v1/realtime` goes on to the WebSocket handshake. Static files come from the
web directory (`resolve_static` refuses anything that could leave it).
/healthz is 200 while the process serves; /readyz is 503 (JSON body saying
why: loading, not_ready, stopping) while the engine loads, when
`engine.ready()` says no or does not answer within `ready_timeout` seconds,
and during shutdown, else 200. /metrics is the Prometheus text format of
metrics.py.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import json
import logging
import mimetypes
from pathlib import Path
from typing import Protocol
from urllib.parse import unquote, urlsplit

from websockets.datastructures import Headers
from websockets.http11 import Response

from voice_agent.engine.base import Engine
from voice_agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from voice_agent.metrics import Metrics

logger = logging.getLogger("voice_agent.transports.websocket")

REALTIME_PATH = "/v1/realtime"
# Seconds /readyz waits for engine.ready() (Config.ready_timeout when it has one).
READY_TIMEOUT = 2.0

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".htm": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".wav": "audio/wav",
    ".wasm": "application/wasm",
}


def default_web_dir() -> Path:
    """The bundled page: web/ next to the voice_agent package."""
    return Path(__file__).resolve().parents[3] / "web"


def response(status: int, body: bytes, content_type: str) -> Response:
    code = http.HTTPStatus(status)
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-cache"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
    return Response(code.value, code.phrase, headers, body)


def text_response(status: int, text: str) -> Response:
    return response(status, text.encode(), "text/plain; charset=utf-8")


def resolve_static(root: Path, url_path: str) -> Path | None:
    """The file under `root` that `url_path` names, or None.

    Refuses anything that could leave `root`: `..` or `.` segments (also
    percent-encoded), dotfiles, backslashes, NUL, and symlinks resolving
    outside. A directory means its index.html.
    """
    path = unquote(url_path)
    if "\x00" in path or "\\" in path:
        return None
    parts = [p for p in path.split("/") if p]
    if any(p.startswith(".") for p in parts):
        return None
    try:
        base = root.resolve()
        target = base.joinpath(*parts)
        if target.is_dir():
            target = target / "index.html"
        resolved = target.resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if not resolved.is_relative_to(base) or not resolved.is_file():
        return None
    return resolved


def _guess(path: Path) -> str:
    kind, _ = mimetypes.guess_type(path.name)
    return kind or "application/octet-stream"


def static_file(root: Path, path: str) -> Response:
    """The static file `path` under `root`, or 404 (blocking: run off the loop)."""
    target = resolve_static(root, path)
    if target is None:
        return text_response(404, "not found\n")
    try:
        body = target.read_bytes()
    except OSError:
        return text_response(404, "not found\n")
    return response(200, body, CONTENT_TYPES.get(target.suffix.lower(), _guess(target)))


class ServerState(Protocol):
    """What the routes read of the server."""

    engine: Engine
    web_dir: Path

    @property
    def metrics(self) -> Metrics: ...

    @property
    def engine_state(self) -> str: ...

    @property
    def stopping(self) -> bool: ...

    @property
    def open_sessions(self) -> int: ...


class Routes:
    """The HTTP answers of one server; see the module doc."""

    def __init__(self, server: ServerState, *, ready_timeout: float = READY_TIMEOUT) -> None:
        self.server = server
        self.ready_timeout = ready_timeout

    async def answer(self, url_path: str) -> Response | None:
        """The response to a GET of `url_path`; None: the WebSocket handshake goes on."""
        path = urlsplit(url_path).path
        server = self.server
        if path == REALTIME_PATH:
            return None
        if path == "/healthz":
            body = {
                "status": "ok",
                "model": server.engine.model_name,
                "demo_model": server.engine.demo_model,
                "sessions": server.open_sessions,
            }
            return response(200, json.dumps(body).encode(), "application/json")
        if path == "/readyz":
            status, ready = await self.readiness()
            return response(status, json.dumps(ready).encode(), "application/json")
        if path == "/metrics":
            return response(200, server.metrics.render(), METRICS_CONTENT_TYPE)
        return await asyncio.to_thread(static_file, server.web_dir, path)

    async def readiness(self) -> tuple[int, dict[str, object]]:
        """/readyz: (200, ...) when the engine has started and answers, else
        (503, ...) with the reason in "status": loading, not_ready, stopping."""
        engine = self.server.engine
        body: dict[str, object] = {"model": engine.model_name}
        if self.server.stopping:
            return 503, {"status": "stopping", **body}
        if self.server.engine_state != "started":
            loading = getattr(engine, "loading_seconds", None)
            if callable(loading):
                body["loading_s"] = round(float(loading()), 1)
            return 503, {"status": "loading", **body}
        try:
            ready = await asyncio.wait_for(engine.ready(), self.ready_timeout)
        except Exception as exc:  # a timeout or a failing check: not ready
            logger.warning("engine readiness check failed: %s", type(exc).__name__)
            ready = False
        if not ready:
            return 503, {"status": "not_ready", **body}
        return 200, {"status": "ready", "demo_model": engine.demo_model, **body}
