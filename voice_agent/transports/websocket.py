"""The WebSocket transport: the page, /healthz, /readyz, /metrics and /v1/realtime on one port.

Built on the websockets asyncio server. Plain HTTP GETs are answered from
`process_request` (static files from the web directory, health and metrics);
`/v1/realtime` upgrades to a WebSocket whose messages follow PROTOCOL.md and
drive one LiveSession each. Every session shares the one engine.

Health and metrics: the port opens before the engine starts (an
engine.deferred.DeferredEngine loads the model then). /healthz is 200 while
the process serves; /readyz is 503 (JSON body saying why) while the engine
loads, when `engine.ready()` says no or does not answer within
READY_TIMEOUT seconds, and during shutdown, else 200. While the engine loads,
realtime connections are closed at once with 1013 (try again later).
/metrics is the Prometheus text format of metrics.py; the server registers
its callbacks there (open sessions, send and turn queue depths, the engine's
runtime_stats, the limit counters below), read only when scraped.

Limits and their behaviour:
- a frame over `max_message_bytes`: websockets closes the connection with 1009;
- more than `max_sessions` open realtime connections: the new one is accepted
  and closed at once with 1013 (try again later);
- more than `max_connections_per_client` from one client address: 1013 too;
- incoming messages: websockets buffers a bounded number (its `max_queue`),
  then stops reading the socket, so a fast sender is slowed by TCP; beyond
  `max_messages_per_second`, or audio beyond `max_audio_speed` times real
  time (after a 10 s allowance), the server waits before reading on
  (limits.py), so such a sender is slowed the same way and nothing piles up;
- outgoing events: a queue of `send_queue` events per connection, written by
  one task; a client that stops reading fills it and is closed with 1008
  (its reply is cancelled at once); other clients are not affected;
- no client message for `idle_timeout` seconds while no reply runs: close 1000;
- a malformed message: an `error` event; the connection stays open.

Access (checked in this order): an `Origin` header, when present, must be the
server's own page (scheme://Host, Host being an IP literal, `localhost` or the
configured host) or one of `allowed_origins`, else close 1008; with tokens
(`token`, `tokens_file`), session.start must carry one of them (compared with
hmac.compare_digest against every token) and nothing else is accepted before
it, else close 1008. A conversation is resumed only with the token that
opened it. `tls_cert`/`tls_key` serve https:// and wss://.

Persistence: with a `store` (store.py), every finished or cancelled turn saves
the conversation (off the event loop, in order), as does the end of the
session; a session_id that is not in memory is looked up in the store and
rebuilt with `engine.restore`. With a shared store (PostgreSQL, gateway
replicas) a conversation kept in memory is reloaded from the store when
another replica has carried it on since.

WebRTC (`webrtc.offer`, see transports/webrtc.py): when aiortc is installed,
an offer on a started session gets a peer connection whose audio track feeds
the session instead of binary frames (both keep working); a second offer
replaces the first. The peer connection is closed when the WebSocket closes
or the server shuts down. Without aiortc the offer is refused (bad_message).

Home automation: with a `bus` (hub.CommandBus), a session whose session.start
names a `device` ([A-Za-z0-9_-]{1,64}, else bad_message) hands the commands of
its replies to the bus (MQTT publishes them on PREFIX/DEVICE/command) and gets
a `command` event for each command MQTT extracted for the same device.

Spoken replies: with a `speech` (tts/speaker.py) and unless session.start
says `speak: false`, each reply is also spoken: `reply.audio.started`, binary
PCM16 frames at `output_sample_rate`, `reply.audio.done`, paced at real time
at most `tts_lead_ms` ahead of the clock (tts/speaker.py). Audio takes at most
half of the send queue (it waits for room; events never do). A `cancel` also
stops the audio of a reply whose text is already done, as does a barge-in
while that audio plays (Session's StopAudio). On a WebRTC session
whose peer connection is connected when a reply's audio starts, that audio
goes on the peer connection's reply track (transports/reply_track.py, paced
in real time, what it buffers dropped at once by a cancel or
`reply.cancelled`) instead of binary frames; the events stay on the socket.

Shutdown (`shutdown`): stop accepting, close every WebRTC peer connection,
cancel every reply in flight, close every connection with 1001, then close
the engine (unless told not to).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import hashlib
import hmac
import http
import ipaddress
import json
import logging
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import Event

from voice_agent.commands import valid_device_name
from voice_agent.config import Config
from voice_agent.engine.base import Conversation, Engine
from voice_agent.errors import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_AGAIN,
    BadMessage,
    ConfigError,
    NotStarted,
    PolicyViolation,
    VoiceAgentError,
    to_wire,
)
from voice_agent.hub import CommandBus
from voice_agent.limits import AudioPacer, MessageLimiter
from voice_agent.live import LiveSession, session_config
from voice_agent.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from voice_agent.metrics import Metric, Metrics, counter
from voice_agent.protocol import (
    AudioCommit,
    CancelReply,
    ClientEvent,
    Playback,
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyDone,
    ServerEvent,
    SessionStart,
    SessionStarted,
    SessionUpdate,
    TextTurn,
    WebRTCAnswer,
    WebRTCOffer,
    decode_client,
    encode,
    error_event,
)
from voice_agent.tts.speaker import ReplySpeaker, Speech

if TYPE_CHECKING:
    from voice_agent.store import Store, StoredSession
    from voice_agent.transports.reply_track import ReplyTrack
    from voice_agent.transports.webrtc import WebRTCInput

logger = logging.getLogger("voice_agent.transports.websocket")

REALTIME_PATH = "/v1/realtime"
READY_TIMEOUT = 2.0  # seconds /readyz waits for engine.ready()

# What the limit counters count (exported as voice_agent_<name>).
LIMIT_HELP = {
    "auth_failures_total": "connections closed for a missing or wrong token",
    "origin_refused_total": "handshakes refused for their Origin",
    "client_limit_total": "connections refused: too many from one address",
    "slow_consumer_closes_total": "connections closed for not reading their events",
    "idle_closes_total": "connections closed after the idle timeout",
    "throttled_seconds_total": "seconds readers waited to keep clients within the rate limits",
    "sessions_restored_total": "conversations resumed from the store",
    "store_errors_total": "conversations the store failed to save",
}

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


def load_tokens(config: Config) -> tuple[str, ...]:
    """The accepted tokens: `--token` plus the lines of `--tokens-file`."""
    tokens = [config.token] if config.token else []
    if config.tokens_file:
        try:
            text = Path(config.tokens_file).read_text(encoding="utf-8")
        except (OSError, UnicodeError) as exc:
            raise ConfigError(f"cannot read tokens file {config.tokens_file}: {exc}") from None
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                tokens.append(line)
        if not tokens:
            raise ConfigError(f"tokens file {config.tokens_file} holds no token")
    return tuple(tokens)


def check_token(given: str | None, tokens: tuple[str, ...]) -> str:
    """The owner name of `given` (a hash, never the token) or PolicyViolation.
    Every token is compared, in constant time, whatever matches."""
    if not tokens:
        return ""
    candidate = (given or "").encode("utf-8", "replace")
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(candidate, token.encode("utf-8"))
    if not ok or not given:
        raise PolicyViolation("missing or wrong token")
    return hashlib.sha256(candidate).hexdigest()[:32]


def _is_local_name(host: str) -> bool:
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def origin_allowed(
    origin: str | None,
    host_header: str | None,
    *,
    scheme: str,
    allowed: tuple[str, ...],
    server_host: str,
) -> bool:
    """Whether a handshake with this Origin may go on.

    No Origin (not a browser): yes. An exact entry of `allowed`: yes. The
    server's own page (`scheme://Host`): yes when Host names the server by an
    IP address, `localhost` or the configured host; a Host reached through any
    other name could be DNS rebinding, so that name must be in `allowed`.
    """
    if origin is None:
        return True
    if origin in allowed:
        return True
    if not host_header or origin != f"{scheme}://{host_header}":
        return False
    name = urlsplit(f"//{host_header}").hostname or ""
    return _is_local_name(name) or name == server_host.lower()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
        store: Store | None = None,
        speech: Speech | None = None,
    ) -> None:
        self.config = config
        # Spoken replies (tts/speaker.py): None when the server does not speak.
        self.speech = speech
        self.tokens = load_tokens(config)  # ConfigError before anything listens
        self.store = store
        # Saves run in order on one thread, off the event loop.
        self._saver = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="store")
        self._saves: set[asyncio.Future[None]] = set()  # saves and slow-client closes
        self.limit_counters = {
            "auth_failures_total": 0,
            "origin_refused_total": 0,
            "client_limit_total": 0,
            "slow_consumer_closes_total": 0,
            "idle_closes_total": 0,
            "throttled_seconds_total": 0.0,
            "sessions_restored_total": 0,
            "store_errors_total": 0,
        }
        self.engine = engine
        self.close_engine = close_engine
        # Commands between the sessions of a named device and MQTT (hub.py).
        self.bus = bus
        self.sessions: dict[str, LiveSession] = {}
        # Prometheus metrics on a registry of this server's own (metrics.py).
        self.metrics = Metrics()
        self.metrics.sessions_open.set_function(lambda: len(self.sessions))
        self.metrics.add_queue("send", lambda: [c.queued for c in self._live_connections])
        self.metrics.add_queue("turns", lambda: [s.session.queued for s in self.sessions.values()])
        self.metrics.watch_engine(engine)
        self.metrics.add_collector(self._limit_families)
        # "stopped" -> "loading" (listening, the engine starts) -> "started"
        self.engine_state = "stopped"
        # Conversations whose connection ended, kept for resuming by session_id
        # (least recently detached dropped first, at most max_sessions of them).
        self.detached: OrderedDict[str, _Detached] = OrderedDict()
        self.web_dir = Path(config.web_dir) if config.web_dir else default_web_dir()
        self._connections = 0  # open realtime connections (what max_sessions limits)
        self._per_client: dict[str, int] = {}  # open connections by client address
        self._live_connections: set[_Connection] = set()
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
        """Listen, then start the engine (a DeferredEngine loads the model now:
        /healthz answers and /readyz says 503 meanwhile); `port` is known as
        soon as the port is open. Returns once the engine has started; when
        that fails, the port is closed again and the error raised."""
        self.webrtc = _load_webrtc()
        if self.webrtc is not None:
            self.webrtc.parse_ice_servers(self.config.ice_servers)  # ConfigError early
        ssl_context = self._ssl_context()
        if not self.tokens and not _is_loopback(self.config.host):
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
            max_size=self.config.max_message_bytes,
            ping_interval=self.config.ping_interval or None,
            ping_timeout=self.config.ping_timeout or None,
            close_timeout=5,
            ssl=ssl_context,
            create_connection=_FastConnection,
            # No permessage-deflate: PCM barely compresses, and deflating and
            # inflating every 20 ms frame costs CPU on both ends for nothing.
            compression=None,
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        self.engine_state = "loading"
        try:
            await self.engine.start()
        except BaseException:
            self.engine_state = "stopped"
            server, self._server = self._server, None
            server.close()
            await server.wait_closed()
            raise
        self.engine_state = "started"

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
        """Stop accepting; let replies in flight run for up to `drain_timeout`
        seconds, then cancel the rest; flush and save every session; close
        connections with 1001; close the engine. Idempotent."""
        if self._shutting_down:
            await self._closed.wait()
            return
        self._shutting_down = True
        try:
            lives = list(self.sessions.values())
            logger.info("shutting down", extra={"sessions": len(lives)})
            if self._server is not None:
                self._server.server.close()  # stop accepting (the listening sockets)
            await self._drain(lives)
            peers = list(self.peers.values())
            await asyncio.gather(*(peer.close() for peer in peers), return_exceptions=True)
            conns = list(self._live_connections)
            await asyncio.gather(*(c.flush(2.0) for c in conns), return_exceptions=True)
            await asyncio.gather(*(live.close() for live in lives), return_exceptions=True)
            for conn in conns:
                self.save(conn)
            await self.wait_saved()
            # Closed here, bounded: a client that does not read cannot hold shutdown up.
            await asyncio.gather(
                *(close_or_abort(c.ws, CLOSE_GOING_AWAY, "server shutting down") for c in conns),
                return_exceptions=True,
            )
            if self._server is not None:
                self._server.close(close_connections=True, code=CLOSE_GOING_AWAY)
                await self._server.wait_closed()
            if self.close_engine:
                await self.engine.close()
        finally:
            self._saver.shutdown(wait=True)
            self._closed.set()

    async def _drain(self, lives: list[LiveSession]) -> None:
        """Wait for replies in flight (bounded), then cancel what still runs and
        wait (bounded) for the engine to settle the cancelled turns."""
        deadline = time.monotonic() + self.config.drain_timeout
        while any(live.replies_in_flight for live in lives) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        running = [live for live in lives if live.replies_in_flight and not live.closed]
        await asyncio.gather(*(live.cancel() for live in running), return_exceptions=True)
        deadline = time.monotonic() + 2.0
        while any(live.replies_in_flight for live in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- persistence ------------------------------------------------------

    def save(self, conn: _Connection) -> None:
        """Queue a save of the connection's conversation (ordered, off the loop)."""
        store, live = self.store, conn.live
        if store is None or live is None:
            return
        from voice_agent.store import StoredSession

        try:
            history = self.engine.snapshot(live.conversation)
        except Exception:
            logger.exception("snapshot failed", extra={"session_id": live.session_id})
            return
        if history is None:
            return
        record = StoredSession(
            session_id=live.session_id,
            owner=conn.owner,
            device=live.device,
            system_prompt=live.conversation.system_prompt,
            ids_used=live.session.ids_used,
            history=history,
        )
        future = asyncio.wrap_future(self._saver.submit(self._save_now, store, record))
        self._saves.add(future)
        future.add_done_callback(self._saves.discard)

    def _save_now(self, store: Store, record: StoredSession) -> None:
        try:
            store.save(record)
        except Exception:
            self.limit_counters["store_errors_total"] += 1
            logger.exception(
                "saving a conversation failed", extra={"session_id": record.session_id}
            )

    async def wait_saved(self) -> None:
        """Wait until every queued save is on disk."""
        while self._saves:
            await asyncio.gather(*list(self._saves), return_exceptions=True)
            self._saves = {f for f in self._saves if not f.done()}

    # -- resuming conversations --------------------------------------------

    def detach(self, live: LiveSession, owner: str = "") -> None:
        """Keep an ended session's conversation so the client can resume it."""
        if self._shutting_down:
            return
        self.engine.release(live.conversation)
        self.detached[live.session_id] = _Detached(
            live.conversation, live.session.ids_used, owner, live.device
        )
        while len(self.detached) > self.config.max_sessions:
            self.detached.popitem(last=False)

    async def resume(self, session_id: str | None, owner: str = "") -> _Detached | None:
        """The conversation `session_id` (in memory, else from the store), or
        None (unknown, expired, opened with another token, or still attached
        to another connection: a new session starts instead)."""
        if session_id is None or session_id in self.sessions:
            return None
        detached = self.detached.get(session_id)
        if detached is not None:
            if not hmac.compare_digest(detached.owner, owner):
                return None
            detached = self.detached.pop(session_id)
            if self.store is None or not self.store.shared:
                return detached
            # A shared store (gateway replicas): another replica may have
            # carried the conversation on since it was detached here.
            if not await self._newer_in_store(self.store, session_id, detached):
                return None if session_id in self.sessions else detached
            logger.info(
                "conversation carried on by another replica: reloading it",
                extra={"session_id": session_id},
            )
        if self.store is None:
            return None
        store = self.store
        await self.wait_saved()
        try:
            record = await asyncio.get_running_loop().run_in_executor(
                self._saver, store.load, session_id
            )
        except Exception:
            logger.exception("loading a conversation failed", extra={"session_id": session_id})
            return None
        if record is None or not hmac.compare_digest(record.owner, owner):
            return None
        if session_id in self.sessions:  # taken while we were reading
            return None
        try:
            conversation = self.engine.restore(session_id, record.system_prompt, record.history)
        except Exception:
            logger.exception("restoring a conversation failed", extra={"session_id": session_id})
            return None
        self.limit_counters["sessions_restored_total"] += 1
        return _Detached(conversation, record.ids_used, owner, record.device)

    async def _newer_in_store(self, store: Store, session_id: str, detached: _Detached) -> bool:
        """Whether the store holds more turns of the conversation than `detached`."""
        await self.wait_saved()  # this replica's own saves first
        try:
            turns = await asyncio.get_running_loop().run_in_executor(
                self._saver, store.turns_of, session_id
            )
        except Exception:
            logger.exception("reading a conversation failed", extra={"session_id": session_id})
            return False
        return turns is not None and turns > detached.conversation.turns

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
        if path == "/readyz":
            status, body = await self.readiness()
            return _response(status, json.dumps(body).encode(), "application/json")
        if path == "/metrics":
            return _response(200, self.metrics.render(), METRICS_CONTENT_TYPE)
        return await asyncio.to_thread(self._static, path)

    async def readiness(self) -> tuple[int, dict[str, object]]:
        """/readyz: (200, ...) when the engine has started and answers, else
        (503, ...) with the reason in "status": loading, not_ready, stopping."""
        body: dict[str, object] = {"model": self.engine.model_name}
        if self._shutting_down:
            return 503, {"status": "stopping", **body}
        if self.engine_state != "started":
            loading = getattr(self.engine, "loading_seconds", None)
            if callable(loading):
                body["loading_s"] = round(float(loading()), 1)
            return 503, {"status": "loading", **body}
        try:
            ready = await asyncio.wait_for(self.engine.ready(), READY_TIMEOUT)
        except Exception as exc:  # a timeout or a failing check: not ready
            logger.warning("engine readiness check failed: %s", type(exc).__name__)
            ready = False
        if not ready:
            return 503, {"status": "not_ready", **body}
        return 200, {"status": "ready", "demo_model": self.engine.demo_model, **body}

    def _limit_families(self) -> list[Metric]:
        """The limit counters (read at scrape time; the dict is the source)."""
        return [
            counter(name, LIMIT_HELP.get(name, name.replace("_", " ")), float(value))
            for name, value in list(self.limit_counters.items())
        ]

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
        headers = ws.request.headers if ws.request is not None else Headers()
        if not origin_allowed(
            headers.get("Origin"),
            headers.get("Host"),
            scheme="https" if self.tls else "http",
            allowed=self.config.allowed_origins,
            server_host=self.config.host,
        ):
            self.limit_counters["origin_refused_total"] += 1
            logger.warning("origin not allowed", extra={"origin": headers.get("Origin", "")[:200]})
            await ws.close(CLOSE_POLICY, "origin not allowed")
            return
        if self.engine_state != "started":
            await ws.close(CLOSE_TRY_AGAIN, "the model is loading, try again later")
            return
        if self._connections >= self.config.max_sessions:
            logger.warning("session limit reached", extra={"limit": self.config.max_sessions})
            await ws.close(CLOSE_TRY_AGAIN, "server at its session limit, try again later")
            return
        address = str(ws.remote_address[0]) if ws.remote_address else "?"
        if self._per_client.get(address, 0) >= self.config.max_connections_per_client:
            self.limit_counters["client_limit_total"] += 1
            logger.warning(
                "connection limit per client reached",
                extra={"limit": self.config.max_connections_per_client},
            )
            await ws.close(CLOSE_TRY_AGAIN, "too many connections from this address")
            return
        self._connections += 1
        self._per_client[address] = self._per_client.get(address, 0) + 1
        conn = _Connection(self, ws)
        self._live_connections.add(conn)
        try:
            await conn.run()
        finally:
            self._live_connections.discard(conn)
            self._connections -= 1
            left = self._per_client.get(address, 1) - 1
            if left > 0:
                self._per_client[address] = left
            else:
                self._per_client.pop(address, None)


class _FastConnection(ServerConnection):
    """A ServerConnection that hands a binary frame straight to `audio_sink`
    when the handler waits in recv() with nothing queued: the usual 20 ms
    audio frame then costs no queue, future or task switch (about a fifth of
    the server's CPU under many streams). The sink returns False to decline;
    text, fragments and frames that arrive while the handler is busy take
    websockets' normal path, so messages keep their order. Relies on the
    Assembler's queue (websockets 17, pinned); without it, every frame takes
    the normal path."""

    audio_sink: Callable[[bytes], bool] | None = None
    fast_frames = 0  # frames the sink took (tests check the path is used)

    def process_event(self, event: Event) -> None:
        sink = self.audio_sink
        if (
            sink is not None
            and isinstance(event, Frame)
            and event.opcode is Opcode.BINARY
            and event.fin
            and _idle(self)
        ):
            data = event.data
            if sink(data if type(data) is bytes else bytes(data)):
                self.fast_frames += 1
                return
        super().process_event(event)


def _idle(conn: ServerConnection) -> bool:
    """The handler is waiting in recv() for a new message and none is queued."""
    try:
        assembler = conn.recv_messages
        frames = assembler.frames
        waiter = frames.get_waiter
        return (
            waiter is not None
            and not waiter.done()
            and not frames.queue
            and assembler.get_in_progress
            and not assembler.closed
        )
    except AttributeError:  # another websockets: no fast path
        return False


@dataclass(frozen=True)
class _Detached:
    conversation: Conversation
    ids_used: tuple[int, int]
    owner: str = ""
    device: str | None = None


class _Connection:
    """One realtime WebSocket: protocol handling in front of one LiveSession."""

    def __init__(self, app: WebSocketServerApp, ws: ServerConnection) -> None:
        self.app = app
        self.ws = ws
        self.live: LiveSession | None = None
        self.session_id: str | None = None
        self.owner = ""  # hash of the token this session was opened with
        self.audio_format = (16000, 1)  # (sample_rate, channels) from session.start
        self.output_rate = 16000  # the spoken replies' rate, from session.start
        self.peer: WebRTCInput | None = None
        self.speaker: ReplySpeaker | None = None  # when this session's replies are spoken
        # The reply whose audio goes out on the WebRTC track, and that track
        # (chosen at reply.audio.started; None: binary frames).
        self._reply_route: tuple[str, ReplyTrack] | None = None
        config = app.config
        # Outgoing events: bounded; one writer task sends them in order.
        self._out: asyncio.Queue[str | bytes] = asyncio.Queue(config.send_queue)
        # Reply audio fills at most half of it, so events always find room.
        self._room = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._last_seen = 0.0  # loop time of the last client message
        self._messages = MessageLimiter(config.max_messages_per_second, time.monotonic)
        self._pacer = AudioPacer(config.max_audio_speed, time.monotonic)
        # Set when the fast path paced a frame and passed it on: run() waits
        # this long for that frame (the next message it gets) instead of
        # pacing it again.
        self._prepaid: float | None = None
        self._tasks: set[asyncio.Task[bool]] = set()
        self._loop = asyncio.get_running_loop()
        if isinstance(ws, _FastConnection):
            ws.audio_sink = self._audio_now

    @property
    def queued(self) -> int:
        """Events and audio frames waiting to be written (the send queue)."""
        return self._out.qsize()

    async def send(self, event: ServerEvent) -> None:
        """Queue one event; never blocks. A closed peer is not an error (run()
        sees it); a full queue means the client stopped reading: close 1008."""
        if self._closing:
            return
        if self.speaker is not None:
            self.speaker.observe(event)  # a cancel stops the audio before it is queued
            self._route_reply_audio(event)
        try:
            self._out.put_nowait(encode(event))
        except asyncio.QueueFull:
            self._too_slow()
            return
        if isinstance(event, ReplyDone | ReplyCancelled):
            self.app.save(self)

    def _route_reply_audio(self, event: ServerEvent) -> None:
        """WebRTC: a reply's audio goes on the peer connection's track when it is
        connected as the reply's audio starts; a cancel drops what it holds."""
        if isinstance(event, ReplyAudioStarted):
            peer = self.peer
            track = peer.reply_track if peer is not None and peer.sending else None
            self._reply_route = (event.reply_id, track) if track is not None else None
        elif isinstance(event, ReplyAudioDone):
            route = self._reply_route
            if route is not None and route[0] == event.reply_id:
                self._reply_route = None
                if event.cancelled:
                    route[1].clear()
                else:
                    route[1].flush()
        elif isinstance(event, ReplyCancelled):
            self._clear_reply_track()

    def _clear_reply_track(self) -> None:
        """Drop the reply audio buffered in the WebRTC track (a cancel, a barge-in)."""
        self._reply_route = None
        peer = self.peer
        if peer is not None and peer.reply_track is not None:
            peer.reply_track.clear()

    async def send_audio(self, pcm: bytes) -> None:
        """Queue one binary frame of reply audio; waits while the queue is half full.
        A reply routed to the WebRTC track is written there instead (paced by it)."""
        route = self._reply_route
        if route is not None and self.speaker is not None:
            await route[1].write(pcm, self.speaker.sample_rate)
            return
        while not self._closing and self._out.qsize() >= max(1, self._out.maxsize // 2):
            self._room.clear()
            await self._room.wait()
        if not self._closing:
            self._out.put_nowait(pcm)

    def _too_slow(self) -> None:
        self._closing = True
        self.app.limit_counters["slow_consumer_closes_total"] += 1
        logger.warning(
            "client not reading, closing",
            extra={"session_id": self.session_id, "queued": self._out.qsize()},
        )
        task = asyncio.create_task(self._close_slow())
        self.app._saves.add(task)  # shutdown waits for it too
        task.add_done_callback(self.app._saves.discard)

    async def _close_slow(self) -> None:
        if self.live is not None:
            await self.live.close()  # cancels its generation now
        if self._writer is not None:
            self._writer.cancel()
        await close_or_abort(self.ws, CLOSE_POLICY, "client too slow: events not read")

    async def _write_loop(self) -> None:
        while True:
            data = await self._out.get()
            try:
                await self.ws.send(data)
            except ConnectionClosed:
                return
            finally:
                self._out.task_done()
                self._room.set()

    async def flush(self, timeout: float) -> None:
        """Wait (bounded) until the queued events are written."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._out.join(), timeout)

    async def _send_error(self, exc: BaseException) -> None:
        event = error_event(exc)
        self.app.metrics.errors.labels(event.code).inc()
        await self.send(event)

    async def _watch_idle(self, idle: float) -> None:
        """Close the connection (1000) after `idle` seconds without a client
        message while no reply runs. One sleeping task per connection, not a
        timer per message (that cost 15 % of the server's CPU under load)."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(max(0.05, self._last_seen + idle - loop.time()))
            live = self.live
            if loop.time() - self._last_seen < idle or (live and live.replies_in_flight):
                if live and live.replies_in_flight:
                    self._last_seen = loop.time()  # idle counts from the reply's end
                continue
            self._closing = True
            self.app.limit_counters["idle_closes_total"] += 1
            logger.info("idle session closed", extra={"session_id": self.session_id})
            await close_or_abort(self.ws, CLOSE_NORMAL, "idle timeout")
            return

    def _wait_for(self, message: str | bytes) -> float:
        """Seconds the message and audio rate limits ask to wait before this
        message is handled (limits.py); spends the message's allowance."""
        now = time.monotonic()  # one clock read for both limits
        wait = self._messages.message(now)
        if isinstance(message, bytes) and self.live is not None:
            rate, channels = self.audio_format
            wait = max(wait, self._pacer.audio(len(message) / (2 * channels * rate), now))
            if wait > 0:  # (nothing to count for the usual frame: no dict update)
                self.app.limit_counters["throttled_seconds_total"] += wait
        return wait

    async def _pace(self, message: str | bytes) -> None:
        wait, self._prepaid = self._prepaid, None
        if wait is None:
            wait = self._wait_for(message)
        if wait > 0:
            await asyncio.sleep(wait)

    def _audio_now(self, pcm: bytes) -> bool:
        """The fast path (called by _FastConnection inside the protocol, with
        run() waiting in recv()): pace and feed one audio frame now. False
        passes the frame on to run(), which handles it in order."""
        live = self.live
        if live is None or self._closing or live.closed:
            return False
        if len(pcm) % (2 * self.audio_format[1]):
            return False  # run() reports the bad frame
        self._last_seen = self._loop.time()
        wait = self._wait_for(pcm)
        if wait <= 0:
            try:
                if live.feed_audio_now(pcm):
                    return True
            except Exception as exc:  # as run() would: an error event, or a close
                task = self._loop.create_task(self._fail(exc), name="frame-error")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return True
        self._prepaid = wait  # paced here: run() must not count it again
        return False

    async def _fail(self, exc: BaseException) -> bool:
        """Answer a message that failed: an error event, or close the
        connection for errors that close it (True: the connection is done)."""
        if isinstance(exc, VoiceAgentError):
            wire = to_wire(exc)
            if wire.close_code is not None:
                if isinstance(exc, PolicyViolation):
                    self.app.limit_counters["auth_failures_total"] += 1
                await self.flush(1.0)
                await self.ws.close(wire.close_code, wire.message)
                return True
            await self._send_error(exc)
            return False
        logger.error(
            "failed to handle a message",
            exc_info=(type(exc), exc, exc.__traceback__),
            extra={"session_id": self.session_id},
        )
        await self._send_error(RuntimeError())
        return False

    async def run(self) -> None:
        self._writer = asyncio.create_task(self._write_loop())
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        idle = self.app.config.idle_timeout
        watchdog = asyncio.create_task(self._watch_idle(idle)) if idle > 0 else None
        try:
            while not self._closing:
                try:
                    message = await self.ws.recv()
                except ConnectionClosed:
                    break
                self._last_seen = loop.time()
                await self._pace(message)
                if self._closing:
                    break
                try:
                    await self._on_message(message)
                except Exception as exc:
                    if await self._fail(exc):
                        break
        finally:
            if isinstance(self.ws, _FastConnection):
                self.ws.audio_sink = None
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._end()

    async def _end(self) -> None:
        await self._close_peer()
        live = self.live
        if live is not None:
            await live.close()
        if self.speaker is not None:
            await self.speaker.close()
        if self._writer is not None:
            self._writer.cancel()
            await asyncio.gather(self._writer, return_exceptions=True)
        if live is None:
            return
        if self.app.sessions.get(live.session_id) is live:
            del self.app.sessions[live.session_id]
        self.app.save(self)
        self.app.detach(live, self.owner)
        store = self.app.store
        if store is not None and not self.app._shutting_down:
            future = asyncio.wrap_future(self.app._saver.submit(_prune, store))
            self.app._saves.add(future)
            future.add_done_callback(self.app._saves.discard)
        logger.info(
            "session ended",
            extra={"session_id": live.session_id, "close_code": self.ws.close_code},
        )

    async def _on_message(self, message: str | bytes) -> None:
        live = self.live
        if isinstance(message, bytes):
            if live is None:
                if self.app.tokens:
                    raise PolicyViolation("send session.start with the token first")
                raise NotStarted("send session.start before audio")
            await live.feed_audio(message)
            return
        event = decode_client(message)
        if isinstance(event, SessionStart):
            await self._start(event)
            return
        if live is None:
            if self.app.tokens:
                raise PolicyViolation("send session.start with the token first")
            raise NotStarted(f"send session.start before {event.type}")
        await self._dispatch(live, event)

    async def _dispatch(self, live: LiveSession, event: ClientEvent) -> None:
        if isinstance(event, TextTurn):
            await live.text(event.text)
        elif isinstance(event, AudioCommit):
            await live.commit()
        elif isinstance(event, CancelReply):
            if self.speaker is not None:
                self.speaker.stop()  # also the audio of a reply whose text is done
                self._clear_reply_track()
            await live.cancel()
        elif isinstance(event, WebRTCOffer):
            await self._offer(live, event)
        elif isinstance(event, Playback):
            pass  # accepted; what was heard is not used yet
        elif isinstance(event, SessionUpdate):
            self._speak(live, event.speak)
        else:  # a second session.start
            raise BadMessage("the session has already started")

    def _speak(self, live: LiveSession, on: bool) -> None:
        """Spoken replies on or off (session.start, session.update). Off mutes
        the speaker: the reply speaking stops now, later ones are not
        synthesized. On in a session started without them makes the speaker:
        its audio then goes as binary frames (no WebRTC track was negotiated).
        A server that does not speak ignores it."""
        speaker = self.speaker
        if speaker is not None:
            if not on:
                self._clear_reply_track()
            speaker.set_muted(not on)
            return
        if not on or self.app.speech is None:
            return
        self.speaker = ReplySpeaker(
            self.app.speech,
            self.output_rate,
            self.send,
            self.send_audio,
            lead_ms=self.app.config.tts_lead_ms,  # paced: at most this far ahead of real time
            on_playback=live.playback,  # barge-in asks longer speech while it is heard
        )
        live.stop_audio = self.speaker.stop  # a barge-in on a finished reply's audio

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
            speak=self.speaker is not None,  # an outgoing track for the spoken replies
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
        self.owner = check_token(start.token, app.tokens)  # PolicyViolation: close 1008
        device = start.device
        if device is not None and not valid_device_name(device):
            raise BadMessage("session.start: 'device' must match [A-Za-z0-9_-]{1,64}")
        resumed = await app.resume(start.session_id, self.owner)
        if self.live is not None or self._closing:
            raise BadMessage("the session has already started")
        if device is None and resumed is not None:
            device = resumed.device  # a resumed conversation keeps its device
        bus = app.bus if device else None
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
        self.output_rate = start.output_sample_rate
        if start.speak is not False:
            self._speak(live, True)
        app.sessions[session_id] = live
        app.metrics.sessions.inc()
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


async def close_or_abort(
    ws: ServerConnection, code: int, reason: str, timeout: float = 5.0
) -> None:
    """Close with `code`; if the peer does not take the close frame within
    `timeout` (it stopped reading, so websockets waits on the write buffer for
    ever), drop the TCP connection."""
    task = asyncio.create_task(ws.close(code, reason))
    done, _ = await asyncio.wait([task], timeout=timeout)
    if not done:
        ws.transport.abort()
        await asyncio.gather(task, return_exceptions=True)


def _prune(store: Store) -> None:
    try:
        store.prune()
    except Exception:
        logger.exception("pruning stored conversations failed")


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
    config: Config,
    engine: Engine,
    *,
    close_engine: bool = True,
    bus: CommandBus | None = None,
    store: Store | None = None,
    speech: Speech | None = None,
) -> AsyncIterator[WebSocketServerApp]:
    """A started server (port=0 picks a free port: read `server.port`/`server.url`),
    shut down gracefully on exit."""
    app = WebSocketServerApp(
        config, engine, close_engine=close_engine, bus=bus, store=store, speech=speech
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
