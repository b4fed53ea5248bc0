"""The WebSocket transport's server: lifecycle and wiring on one port.

`WebSocketServerApp(config, engine, host=...)` serves, on the sans-I/O
WebSocket server of transports/sansio/ (websockets' public ServerProtocol
driven by our own asyncio.Protocol, with the audio fast path), the page, /healthz,
/readyz, /metrics (http.py) and the native realtime protocol at
/v1/realtime (connection.py) on one port, every session hosted by one
ConversationHost (voice_agent/host/: conversations, saving, speaking,
admission, error reports). Without `host=` the app builds its own from
`store`, `speech` and `bus` and closes it at shutdown (tests, `serve`);
server.py builds one host for every transport and owns it.

The handshake: `process_request` answers plain HTTP (http.py); for
/v1/realtime it checks the Origin (access.py) and asks the host's admission
whether there is room (without taking it). A refusal still completes the
handshake and then closes with the close code of errors.py's one mapping
(reported through host.report): OriginRefused 1008, ShuttingDown 1001,
ModelLoading 1013 ("the model is loading, ..."), ServerFull 1013,
TooManyFromAddress 1013. An accepted connection takes an admission ticket
for its lifetime; its handler is one `_Connection.run()`. A /v1/realtime
request with a `model` query parameter speaks the OpenAI Realtime protocol
instead (openai_realtime/route.py): its API key (Bearer, or the
`openai-insecure-api-key.KEY` subprotocol) is checked like a token at the
handshake (a wrong one: HTTP 401), the `realtime` subprotocol is selected
when offered, and its handler is one `RealtimeConnection.run()`.

Lifecycle: `start()` listens, then starts the engine (a DeferredEngine loads
the model now: /healthz answers and /readyz says 503 meanwhile) and tells
the host the engine started (admission opens). `shutdown()`, idempotent:
the host admits nothing more, the listening socket closes, replies in flight
get `drain_timeout` (host.drain), WebRTC peer connections close, outboxes
are flushed, every session is closed and saved (host.close_sessions), every
connection is closed with 1001 (bounded: a client that does not read cannot
hold it up), then an own host is closed and the engine too (unless
`close_engine=False`).

Limits (Config): `max_message_bytes` (a frame over it: 1009, sent by the
WebSocket library), `max_sessions` and `max_connections_per_client` (host
admission: 1013), `send_queue`, `idle_timeout`, `max_messages_per_second`,
`max_audio_speed` (connection.py). `tls_cert`/`tls_key` serve https:// and
wss://. Counters of this transport (exported as voice_agent_<name>):
LIMIT_HELP below; the host exports client_limit_total,
sessions_restored_total and store_*.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import weakref
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from websockets.http11 import Request, Response

from voice_agent.config import Config
from voice_agent.engine.base import Engine
from voice_agent.errors import (
    CLOSE_GOING_AWAY,
    ConfigError,
    PolicyViolation,
    ShuttingDown,
    VoiceAgentError,
)
from voice_agent.host import ConversationHost, Kept
from voice_agent.hub import CommandBus
from voice_agent.live import LiveSession
from voice_agent.metrics import Metric, Metrics, counter
from voice_agent.transports.openai_realtime import route as openai_route
from voice_agent.transports.sansio import Connection, Server
from voice_agent.transports.sansio import serve as ws_serve
from voice_agent.transports.websocket.access import Access, is_loopback
from voice_agent.transports.websocket.connection import TRANSPORT, _Connection
from voice_agent.transports.websocket.http import (
    REALTIME_PATH,
    Routes,
    default_web_dir,
    text_response,
)
from voice_agent.transports.websocket.outbox import CLOSE_TIMEOUT, close_or_abort
from voice_agent.tts.speaker import Speech

if TYPE_CHECKING:
    from voice_agent.host.saving import StoreLike
    from voice_agent.transports.openai_realtime import RealtimeConnection
    from voice_agent.transports.webrtc import WebRTCInput

logger = logging.getLogger("voice_agent.transports.websocket")

# What this transport's counters count (exported as voice_agent_<name>).
LIMIT_HELP = {
    "auth_failures_total": "connections closed for a missing or wrong token",
    "origin_refused_total": "handshakes refused for their Origin",
    "slow_consumer_closes_total": "connections closed for not reading their events",
    "idle_closes_total": "connections closed after the idle timeout",
    "throttled_seconds_total": "seconds readers waited to keep clients within the rate limits",
}


class WebSocketServerApp:
    """The HTTP + WebSocket server of one process; see the module doc."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        host: ConversationHost | None = None,
        close_engine: bool = True,
        bus: CommandBus | None = None,
        store: StoreLike | None = None,
        speech: Speech | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.close_engine = close_engine
        self._own_host = host is None
        if host is None:
            host = ConversationHost(config, engine, store=store, speech=speech, bus=bus)
        self.host = host
        self.access = Access(config, tls=self.tls)  # ConfigError before anything listens
        self.web_dir = Path(config.web_dir) if config.web_dir else default_web_dir()
        self.routes = Routes(self)
        self.counters: dict[str, float] = dict.fromkeys(LIMIT_HELP, 0)
        self.metrics.add_queue("send", lambda: [c.queued for c in self._connections])
        self.metrics.add_collector(self._families)
        # "stopped" -> "loading" (listening, the engine starts) -> "started"
        self.engine_state = "stopped"
        self._connections: set[_Connection | RealtimeConnection] = set()
        # Handshakes refused by process_request, closed by the handler.
        self._refused: weakref.WeakKeyDictionary[Any, VoiceAgentError] = weakref.WeakKeyDictionary()
        # OpenAI Realtime handshakes whose key passed: the owner of the key.
        self._openai: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._background: set[asyncio.Future[Any]] = set()
        self._server: Server | None = None
        self._port: int | None = None
        self._stopping = False
        self._closed = asyncio.Event()
        # WebRTC: the module (None when aiortc is missing) and the open peer
        # connections by session id.
        self.webrtc: ModuleType | None = None
        self.peers: dict[str, WebRTCInput] = {}

    # -- what the routes, tests and server.py read --------------------------

    @property
    def metrics(self) -> Metrics:
        return self.host.metrics

    @property
    def sessions(self) -> dict[str, LiveSession]:
        """Open sessions (the host's: every transport's)."""
        return self.host.sessions

    @property
    def open_sessions(self) -> int:
        return len(self.host.sessions)

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def connections(self) -> int:
        """Realtime connections open now."""
        return len(self._connections)

    @property
    def fast_frames(self) -> int:
        """Audio frames the open connections' fast path took (0 without one)."""
        return sum(c.fast_frames for c in self._connections)

    @property
    def detached(self) -> Mapping[str, Kept]:
        """Conversations kept for resuming (the host's)."""
        return self.host.conversations.kept

    @property
    def limit_counters(self) -> dict[str, float]:
        """This transport's counters, with the host's that used to live here."""
        refused = self.host.admission.refused
        return {
            **self.counters,
            "client_limit_total": refused.get("address_limit", 0),
            "sessions_restored_total": self.host.conversations.restored,
            "store_errors_total": self.host.saves.stats.errors,
        }

    async def wait_saved(self) -> None:
        await self.host.wait_saved()

    def track(self, coro: Awaitable[Any]) -> None:
        """Run `coro` in the background; shutdown waits for it."""
        future = asyncio.ensure_future(coro)
        self._background.add(future)
        future.add_done_callback(self._background.discard)

    @property
    def tls(self) -> bool:
        return bool(self.config.tls_cert and self.config.tls_key)

    @property
    def port(self) -> int:
        """The bound port (the free one picked for port=0); kept after shutdown."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def http_url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{self._url_host()}:{self.port}/"

    @property
    def url(self) -> str:
        """The realtime endpoint, ws[s]://HOST:PORT/v1/realtime."""
        scheme = "wss" if self.tls else "ws"
        return f"{scheme}://{self._url_host()}:{self.port}{REALTIME_PATH}"

    def _url_host(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0"):
            return "127.0.0.1"
        if host == "::":
            return "[::1]"
        return f"[{host}]" if ":" in host else host

    async def readiness(self) -> tuple[int, dict[str, object]]:
        """/readyz (http.py)."""
        return await self.routes.readiness()

    # -- lifecycle ----------------------------------------------------------

    async def start(self) -> None:
        """Listen, then start the engine; `port` is known as soon as the port
        is open. Returns once the engine has started; when that fails, the
        port is closed again and the error raised."""
        await self.listen()
        await self.start_engine()

    async def listen(self) -> None:
        """Open the port (HTTP answers, WebSocket sessions are refused with
        `loading` until `start_engine` has finished)."""
        self.webrtc = _load_webrtc()
        if self.webrtc is not None:
            self.webrtc.parse_ice_servers(self.config.ice_servers)  # ConfigError early
        ssl_context = self._ssl_context()
        if not self.access.tokens and not is_loopback(self.config.host):
            logger.warning(
                "listening on %s without a token: anyone who can reach the port can talk "
                "to the assistant; set --token or --tokens-file",
                self.config.host,
            )
        self._server = await ws_serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            select_subprotocol=self._select_subprotocol,
            max_size=self.config.max_message_bytes,
            ping_interval=self.config.ping_interval or None,
            ping_timeout=self.config.ping_timeout or None,
            close_timeout=CLOSE_TIMEOUT,
            ssl=ssl_context,
            # No permessage-deflate (the sans-I/O server never offers it): PCM
            # barely compresses, and deflating every 20 ms frame costs CPU.
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        self.engine_state = "loading"

    async def start_engine(self) -> None:
        """Start the engine and open admission; when that fails, the port is
        closed again and the error raised."""
        if self._server is None:
            raise RuntimeError("listen() first")
        try:
            await self.engine.start()
        except BaseException:
            self.engine_state = "stopped"
            server, self._server = self._server, None
            server.close()
            await server.wait_closed()
            raise
        self.engine_state = "started"
        self.host.engine_started()

    def _ssl_context(self) -> ssl.SSLContext | None:
        cert, key = self.config.tls_cert, self.config.tls_key
        if not cert or not key:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load --tls-cert/--tls-key: {exc}") from None
        return context

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
        """See the module doc. Idempotent."""
        if self._stopping:
            await self._closed.wait()
            return
        self._stopping = True
        host = self.host
        try:
            host.begin_shutdown()
            logger.info("shutting down", extra={"sessions": len(host.sessions)})
            if self._server is not None:
                self._server.close(close_connections=False)  # stop accepting
            await host.drain()
            peers = list(self.peers.values())
            await asyncio.gather(*(peer.close() for peer in peers), return_exceptions=True)
            conns = list(self._connections)
            await asyncio.gather(*(c.flush(2.0) for c in conns), return_exceptions=True)
            await host.close_sessions()
            # Closed here, bounded: a client that does not read cannot hold shutdown up.
            await asyncio.gather(
                *(close_or_abort(c.ws, CLOSE_GOING_AWAY, ShuttingDown.reason) for c in conns),
                return_exceptions=True,
            )
            if self._server is not None:
                self._server.close(close_connections=True, code=CLOSE_GOING_AWAY)
                await self._server.wait_closed()
            await asyncio.gather(*list(self._background), return_exceptions=True)
            if self._own_host:
                await host.close()
            if self.close_engine:
                await self.engine.close()
        finally:
            self._closed.set()

    # -- the handshake and the connections --------------------------------------

    async def _process_request(self, connection: Connection, request: Request) -> Response | None:
        """Plain HTTP answered here; /v1/realtime checked (Origin, admission)
        and handed on to the WebSocket handshake."""
        response = await self.routes.answer(request.path)
        if response is not None:
            return response
        try:
            if self.host.shutting_down:
                raise ShuttingDown()
            headers = request.headers
            self.access.check_origin(headers.get("Origin"), headers.get("Host"))
            if openai_route.is_openai(request.path):
                owner = self.access.key_owner(openai_route.api_key(headers))
                if owner is None:
                    self.counters["auth_failures_total"] += 1
                    self.host.report(PolicyViolation(), transport="openai")
                    return text_response(401, "missing or wrong API key\n")
                self._openai[connection] = owner
            self.host.admission.check(_address(connection))
        except VoiceAgentError as exc:
            self._refused[connection] = exc  # closed with its code once open
        return None

    def _select_subprotocol(self, connection: Connection, offered: Sequence[str]) -> str | None:
        """OpenAI Realtime: `realtime` when offered (route.py); native: none."""
        if connection in self._openai:
            return openai_route.select_subprotocol(offered)
        return None

    async def _handle(self, ws: Connection) -> None:
        owner = self._openai.pop(ws, None)  # not None: the OpenAI Realtime protocol
        refusal = self._refused.pop(ws, None)
        ticket = None
        if refusal is None:
            try:
                ticket = self.host.admission.admit(_address(ws))
            except VoiceAgentError as exc:  # the room went while the handshake ran
                refusal = exc
        if refusal is not None or ticket is None:
            transport = TRANSPORT if owner is None else "openai"
            wire = self.host.report(refusal or ShuttingDown(), transport=transport)
            await ws.close(wire.close_code or CLOSE_GOING_AWAY, wire.message)
            return
        conn: _Connection | RealtimeConnection
        if owner is None:
            conn = _Connection(self, ws)
        else:
            from voice_agent.transports.openai_realtime import RealtimeConnection

            conn = RealtimeConnection(self.host, self.config, ws, owner=owner)
        self._connections.add(conn)
        try:
            with ticket:
                await conn.run()
        finally:
            self._connections.discard(conn)

    def _families(self) -> list[Metric]:
        """This transport's counters (read at scrape time)."""
        counts = {**self.counters, "origin_refused_total": self.access.origin_refused}
        return [
            counter(name.removesuffix("_total"), LIMIT_HELP[name], float(value))
            for name, value in counts.items()
        ]


def _address(ws: Connection) -> str:
    """The client's IP address (what max_connections_per_client counts)."""
    remote = ws.remote_address
    return str(remote[0]) if remote else "?"


def _load_webrtc() -> ModuleType | None:
    """transports.webrtc, or None when aiortc (the `webrtc` extra) is missing."""
    try:
        from voice_agent.transports import webrtc
    except ImportError as exc:
        logger.info("webrtc disabled: %s", exc.name or "aiortc", extra={})
        return None
    return webrtc


@contextlib.asynccontextmanager
async def running_server(
    config: Config,
    engine: Engine,
    *,
    host: ConversationHost | None = None,
    close_engine: bool = True,
    bus: CommandBus | None = None,
    store: StoreLike | None = None,
    speech: Speech | None = None,
) -> AsyncIterator[WebSocketServerApp]:
    """A started server (port=0 picks a free port: read `server.port`/`server.url`),
    shut down gracefully on exit."""
    app = WebSocketServerApp(
        config, engine, host=host, close_engine=close_engine, bus=bus, store=store, speech=speech
    )
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
