"""The WebSocket transport: one port serves the page, /healthz, /metrics and /v1/realtime.

Built on the websockets asyncio server. Plain HTTP GETs are answered from
`process_request` (static files from the web directory, health and metrics);
`/v1/realtime` upgrades to a WebSocket whose messages follow PROTOCOL.md and
drive one LiveSession each. Every session shares the one engine.

Limits and their behaviour:
- a frame over `max_message_bytes`: websockets closes the connection with 1009;
- more than `max_sessions` open realtime connections: the new one is accepted
  and closed at once with 1013 (try again later);
- incoming messages: websockets buffers a bounded number (its `max_queue`),
  then stops reading the socket, so a fast sender is slowed by TCP;
- a malformed message: an `error` event; the connection stays open.

WebRTC (`webrtc.offer`, see transports/webrtc.py): when aiortc is installed,
an offer on a started session gets a peer connection whose audio track feeds
the session instead of binary frames (both keep working); a second offer
replaces the first. The peer connection is closed when the WebSocket closes
or the server shuts down. Without aiortc the offer is refused (bad_message).

Home automation: with a `bus` (hub.CommandBus), a session whose session.start
names a `device` ([A-Za-z0-9_-]{1,64}, else bad_message) hands the commands of
its replies to the bus (MQTT publishes them on PREFIX/DEVICE/command) and gets
a `command` event for each command MQTT extracted for the same device.

Shutdown (`shutdown`): stop accepting, close every WebRTC peer connection,
cancel every reply in flight, close every connection with 1001, then close
the engine (unless told not to).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http
import json
import logging
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from voice_agent.commands import valid_device_name
from voice_agent.config import Config
from voice_agent.engine.base import Conversation, Engine
from voice_agent.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_TRY_AGAIN,
    BadMessage,
    NotStarted,
    VoiceAgentError,
    to_wire,
)
from voice_agent.hub import CommandBus
from voice_agent.live import LiveSession, Metrics, session_config
from voice_agent.protocol import (
    AudioCommit,
    CancelReply,
    ClientEvent,
    Playback,
    ServerEvent,
    SessionStart,
    SessionStarted,
    TextTurn,
    WebRTCAnswer,
    WebRTCOffer,
    decode_client,
    encode,
    error_event,
)

if TYPE_CHECKING:
    from voice_agent.transports.webrtc import WebRTCInput

logger = logging.getLogger("voice_agent.transports.websocket")

REALTIME_PATH = "/v1/realtime"

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
    return Path(__file__).resolve().parents[2] / "web"


def _response(status: int, body: bytes, content_type: str) -> Response:
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


def _text(status: int, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


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


class WebSocketServerApp:
    """The HTTP + WebSocket server of one process; see the module doc."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        close_engine: bool = True,
        bus: CommandBus | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.close_engine = close_engine
        # Commands between the sessions of a named device and MQTT (hub.py).
        self.bus = bus
        self.metrics = Metrics()
        self.sessions: dict[str, LiveSession] = {}
        # Conversations whose connection ended, kept for resuming by session_id
        # (least recently detached dropped first, at most max_sessions of them).
        self.detached: OrderedDict[str, _Detached] = OrderedDict()
        self.web_dir = Path(config.web_dir) if config.web_dir else default_web_dir()
        self._connections = 0  # open realtime connections (what max_sessions limits)
        self._server: Server | None = None
        self._port: int | None = None
        self._shutting_down = False
        self._closed = asyncio.Event()
        # WebRTC: the module (None when aiortc is missing) and the open peer
        # connections by session id.
        self.webrtc: ModuleType | None = None
        self.peers: dict[str, WebRTCInput] = {}

    # -- lifecycle --------------------------------------------------------

    async def start(self) -> None:
        """Start the engine and listen; `port` is known afterwards."""
        self.webrtc = _load_webrtc()
        if self.webrtc is not None:
            self.webrtc.parse_ice_servers(self.config.ice_servers)  # ConfigError early
        await self.engine.start()
        self._server = await ws_serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=self.config.max_message_bytes,
            ping_interval=self.config.ping_interval or None,
            ping_timeout=self.config.ping_timeout or None,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])

    @property
    def port(self) -> int:
        """The bound port (the free one picked for port=0); kept after shutdown."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def http_url(self) -> str:
        return f"http://{self._url_host()}:{self.port}/"

    @property
    def url(self) -> str:
        """The realtime endpoint, ws://HOST:PORT/v1/realtime."""
        return f"ws://{self._url_host()}:{self.port}{REALTIME_PATH}"

    def _url_host(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    async def serve_forever(self, stop: asyncio.Event | None = None) -> None:
        """Run until `stop` is set (or shutdown() is called), then shut down."""
        if self._server is None:
            await self.start()
        waiters = [asyncio.create_task(self._closed.wait())]
        if stop is not None:
            waiters.append(asyncio.create_task(stop.wait()))
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
            await self.shutdown()

    async def shutdown(self) -> None:
        """Stop accepting, cancel replies, close connections with 1001, close the
        engine. Idempotent."""
        if self._shutting_down:
            await self._closed.wait()
            return
        self._shutting_down = True
        try:
            lives = list(self.sessions.values())
            logger.info("shutting down", extra={"sessions": len(lives)})
            peers = list(self.peers.values())
            await asyncio.gather(*(peer.close() for peer in peers), return_exceptions=True)
            await asyncio.gather(*(live.close() for live in lives), return_exceptions=True)
            if self._server is not None:
                self._server.close(close_connections=True, code=CLOSE_GOING_AWAY)
                await self._server.wait_closed()
            if self.close_engine:
                await self.engine.close()
        finally:
            self._closed.set()

    # -- resuming conversations --------------------------------------------

    def detach(self, live: LiveSession) -> None:
        """Keep an ended session's conversation so the client can resume it."""
        if self._shutting_down:
            return
        self.engine.release(live.conversation)
        self.detached[live.session_id] = _Detached(live.conversation, live.session.ids_used)
        while len(self.detached) > self.config.max_sessions:
            self.detached.popitem(last=False)

    def resume(self, session_id: str | None) -> _Detached | None:
        """The detached conversation `session_id`, or None (unknown, expired or
        still attached to another connection: a new session starts instead)."""
        if session_id is None:
            return None
        return self.detached.pop(session_id, None)

    # -- HTTP -------------------------------------------------------------

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        path = urlsplit(request.path).path
        if path == REALTIME_PATH:
            return None  # the WebSocket handshake goes on
        if path == "/healthz":
            body = {
                "status": "ok",
                "model": self.engine.model_name,
                "demo_model": self.engine.demo_model,
                "sessions": len(self.sessions),
            }
            return _response(200, json.dumps(body).encode(), "application/json")
        if path == "/metrics":
            self.metrics.sessions_active = len(self.sessions)
            return _response(
                200, self.metrics.render().encode(), "text/plain; version=0.0.4; charset=utf-8"
            )
        return await asyncio.to_thread(self._static, path)

    def _static(self, path: str) -> Response:
        target = resolve_static(self.web_dir, path)
        if target is None:
            return _text(404, "not found\n")
        try:
            body = target.read_bytes()
        except OSError:
            return _text(404, "not found\n")
        return _response(200, body, CONTENT_TYPES.get(target.suffix.lower(), _guess(target)))

    # -- WebSocket --------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        if self._shutting_down:
            await ws.close(CLOSE_GOING_AWAY, "server shutting down")
            return
        if self._connections >= self.config.max_sessions:
            logger.warning("session limit reached", extra={"limit": self.config.max_sessions})
            await ws.close(CLOSE_TRY_AGAIN, "server at its session limit, try again later")
            return
        self._connections += 1
        try:
            await _Connection(self, ws).run()
        finally:
            self._connections -= 1


@dataclass(frozen=True)
class _Detached:
    conversation: Conversation
    ids_used: tuple[int, int]


class _Connection:
    """One realtime WebSocket: protocol handling in front of one LiveSession."""

    def __init__(self, app: WebSocketServerApp, ws: ServerConnection) -> None:
        self.app = app
        self.ws = ws
        self.live: LiveSession | None = None
        self.session_id: str | None = None
        self.audio_format = (16000, 1)  # (sample_rate, channels) from session.start
        self.peer: WebRTCInput | None = None

    async def send(self, event: ServerEvent) -> None:
        """Send one event; a closed peer is not an error (run() sees it)."""
        with contextlib.suppress(ConnectionClosed):
            await self.ws.send(encode(event))

    async def _send_error(self, exc: BaseException) -> None:
        event = error_event(exc)
        self.app.metrics.observe(event)
        await self.send(event)

    async def run(self) -> None:
        try:
            async for message in self.ws:
                try:
                    await self._on_message(message)
                except VoiceAgentError as exc:
                    wire = to_wire(exc)
                    await self._send_error(exc)
                    if wire.close_code is not None:
                        await self.ws.close(wire.close_code, wire.message)
                        break
                except Exception:
                    logger.exception(
                        "failed to handle a message", extra={"session_id": self.session_id}
                    )
                    await self._send_error(RuntimeError())
        except ConnectionClosed:
            pass
        finally:
            await self._end()

    async def _end(self) -> None:
        await self._close_peer()
        live = self.live
        if live is None:
            return
        await live.close()
        self.app.sessions.pop(live.session_id, None)
        self.app.detach(live)
        self.app.metrics.sessions_active = len(self.app.sessions)
        logger.info(
            "session ended",
            extra={"session_id": live.session_id, "close_code": self.ws.close_code},
        )

    async def _on_message(self, message: str | bytes) -> None:
        live = self.live
        if isinstance(message, bytes):
            if live is None:
                raise NotStarted("send session.start before audio")
            await live.feed_audio(message)
            return
        event = decode_client(message)
        if isinstance(event, SessionStart):
            await self._start(event)
            return
        if live is None:
            raise NotStarted(f"send session.start before {event.type}")
        await self._dispatch(live, event)

    async def _dispatch(self, live: LiveSession, event: ClientEvent) -> None:
        if isinstance(event, TextTurn):
            await live.text(event.text)
        elif isinstance(event, AudioCommit):
            await live.commit()
        elif isinstance(event, CancelReply):
            await live.cancel()
        elif isinstance(event, WebRTCOffer):
            await self._offer(live, event)
        elif isinstance(event, Playback):
            pass  # accepted; nothing is spoken yet
        else:  # a second session.start
            raise BadMessage("the session has already started")

    async def _offer(self, live: LiveSession, offer: WebRTCOffer) -> None:
        """Answer a WebRTC offer; a previous peer connection is closed first."""
        webrtc = self.app.webrtc
        if webrtc is None:
            raise BadMessage("webrtc is not enabled on this server")
        await self._close_peer()
        config = self.app.config
        rate, channels = self.audio_format
        peer: WebRTCInput = webrtc.WebRTCInput(
            live,
            sample_rate=rate,
            channels=channels,
            ice_servers=config.ice_servers,
            host_addresses=webrtc.host_addresses_for_bind(config.host),
        )
        self.peer = peer
        self.app.peers[live.session_id] = peer
        try:
            answer = await peer.accept(offer.sdp)
        except BaseException:
            await self._close_peer()
            raise
        await self.send(WebRTCAnswer(answer))

    async def _close_peer(self) -> None:
        peer, self.peer = self.peer, None
        if peer is None:
            return
        if self.app.peers.get(peer.session_id) is peer:
            del self.app.peers[peer.session_id]
        await peer.close()

    async def _start(self, start: SessionStart) -> None:
        if self.live is not None:
            raise BadMessage("the session has already started")
        app = self.app
        device = start.device
        if device is not None and not valid_device_name(device):
            raise BadMessage("session.start: 'device' must match [A-Za-z0-9_-]{1,64}")
        bus = app.bus if device else None
        resumed = app.resume(start.session_id)
        session_id = start.session_id if start.session_id and resumed else uuid.uuid4().hex
        live = LiveSession(
            app.engine,
            self.send,
            session_id=session_id,
            config=session_config(app.config, start.system_prompt),
            sample_rate=start.sample_rate,
            channels=start.channels,
            max_new_tokens=app.config.max_new_tokens,
            metrics=app.metrics,
            conversation=resumed.conversation if resumed else None,
            ids_from=resumed.ids_used if resumed else (0, 0),
            device=device,
            on_command=bus.publish if bus is not None else None,
        )
        if bus is not None and device:
            # MQTT-originated commands for this device reach this client too.
            live.add_close_callback(bus.subscribe(device, live.push_command))
        self.live = live
        self.session_id = session_id
        self.audio_format = (start.sample_rate, start.channels)
        app.sessions[session_id] = live
        app.metrics.sessions_total += 1
        app.metrics.sessions_active = len(app.sessions)
        logger.info(
            "session started",
            extra={
                "session_id": session_id,
                "sample_rate": start.sample_rate,
                "channels": start.channels,
                "device": start.device or "",
                "resume_requested": start.session_id is not None,
                "resumed": resumed is not None,
            },
        )
        await self.send(
            SessionStarted(
                session_id, app.engine.model_name, app.engine.demo_model, start.sample_rate
            )
        )


def _load_webrtc() -> ModuleType | None:
    """transports.webrtc, or None when aiortc (the `webrtc` extra) is missing."""
    try:
        from voice_agent.transports import webrtc
    except ImportError as exc:
        logger.info("webrtc disabled: %s", exc.name or "aiortc", extra={})
        return None
    return webrtc


def _guess(path: Path) -> str:
    import mimetypes

    kind, _ = mimetypes.guess_type(path.name)
    return kind or "application/octet-stream"


@contextlib.asynccontextmanager
async def running_server(
    config: Config, engine: Engine, *, close_engine: bool = True, bus: CommandBus | None = None
) -> AsyncIterator[WebSocketServerApp]:
    """A started server (port=0 picks a free port: read `server.port`/`server.url`),
    shut down gracefully on exit."""
    app = WebSocketServerApp(config, engine, close_engine=close_engine, bus=bus)
    await app.start()
    try:
        yield app
    finally:
        await app.shutdown()


async def serve(
    config: Config,
    engine: Engine,
    *,
    ready: asyncio.Event | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve until `stop` is set (forever when None, or until cancelled), then
    shut down gracefully. `ready` is set once the port is listening."""
    app = WebSocketServerApp(config, engine)
    try:
        await app.start()
        logger.info("listening", extra={"url": app.http_url, "realtime": app.url})
        if ready is not None:
            ready.set()
        await app.serve_forever(stop)
    finally:
        await app.shutdown()
