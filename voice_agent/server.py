"""Wires config and engine to the transports; signals and graceful shutdown.

`run(config, engine)` is the CLI's blocking entry point: it serves the page,
/healthz, /readyz, /metrics and /v1/realtime on one port (and, with `--mqtt`,
the MQTT topics; with `--wyoming`, Home Assistant's Wyoming protocol on its own
port, transports/wyoming/) until SIGINT or SIGTERM, then stops accepting, stops
the MQTT side (which publishes `offline` on PREFIX/status) and the Wyoming server,
cancels replies in flight,
closes every connection with 1001 and closes the engine. A second signal
during shutdown exits at once. The port opens before the engine starts (the
CLI hands over an engine.deferred.DeferredEngine, which loads the model
then): /readyz answers 503 until it is loaded, and a signal meanwhile stops
the server at once, without waiting for the load.

Conversations are kept in the store of `--db` (store.py: a SQLite file, or
PostgreSQL shared by gateway replicas; `none` turns it off): each finished
turn is saved, SIGTERM lets replies in flight finish for up to
`--drain-timeout` seconds and saves every conversation before the
connections close, and a restarted server (or, with PostgreSQL, any replica)
resumes a conversation by its session_id. MQTT conversations are kept in the
same store, one per device and `session` ("mqtt:DEVICE[:SESSION]"). The store is pruned
(`--retention-days`, `--max-stored-sessions`) at start-up.

`running(config, engine)` is the same wiring as an async context manager (used
by `run`, tests and benchmarks): one engine, one ConversationHost (host/:
conversations, saving to the store, speaking, admission, error reports, one
/metrics) and one hub.CommandBus shared by the WebSocket sessions and the MQTT
transport, the `--devices` allowlist read once (a bad file is a ConfigError
before anything listens). A broker that refuses
the credentials raises errors.BrokerAuthError (the CLI prints one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from voice_agent.config import Config
from voice_agent.engine.base import Engine
from voice_agent.errors import ConfigError
from voice_agent.host import ConversationHost
from voice_agent.hub import CommandBus, load_devices
from voice_agent.live import prepare_turn_taking
from voice_agent.store import Store, resolve_db
from voice_agent.transports.websocket import WebSocketServerApp
from voice_agent.tts import load_tts
from voice_agent.tts.speaker import Speech

if TYPE_CHECKING:
    from voice_agent.transports.mqtt import MqttTransport
    from voice_agent.transports.wyoming import WyomingServer

logger = logging.getLogger("voice_agent.server")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass
class Services:
    """What `running` started: the conversation host every transport shares,
    the HTTP/WebSocket app, the MQTT transport (None without --mqtt), the
    command bus between them and the Wyoming server (None without --wyoming)."""

    app: WebSocketServerApp
    mqtt: MqttTransport | None
    bus: CommandBus
    store: Store | None = None
    host: ConversationHost | None = None
    wyoming: WyomingServer | None = None  # --wyoming (transports/wyoming/)


@contextlib.asynccontextmanager
async def running(
    config: Config,
    engine: Engine,
    *,
    close_engine: bool = True,
    speech: Speech | None = None,
    **mqtt_kwargs: float,
) -> AsyncIterator[Services]:
    """Start every configured transport on the one engine and the one
    ConversationHost; stop them on exit. `speech` (see `open_speech`) speaks
    the replies; None: text only. `mqtt_kwargs` go to MqttTransport
    (reconnect_min, reconnect_max).

    Shutdown, in the host's order: the host admits nothing more
    (begin_shutdown); MQTT stops first, so `offline` goes out while the
    engine still runs; the Wyoming server stops listening, withdraws its
    zeroconf service and cancels its requests (their conversations are
    saved); the WebSocket app lets replies in flight finish
    (host.drain), closes and saves every session (host.close_sessions) and
    closes its connections with 1001; then the host stops its store thread
    (host.close), the engine closes, and the store last."""
    devices = load_devices(config.devices)  # a bad file fails before anything starts
    prepare_turn_taking(config)  # loads the end-of-turn model once; logs the fallback
    bus = CommandBus()
    store = open_store(config)
    # One host for every transport: conversations, saving, speaking, admission,
    # error reports, one /metrics; its session_config is built here, once.
    host = ConversationHost(config, engine, store=store, speech=speech, bus=bus, devices=devices)
    app = WebSocketServerApp(config, engine, host=host, close_engine=False)
    mqtt: MqttTransport | None = None
    wyoming: WyomingServer | None = None
    try:
        # Every transport listens before the model loads (minutes for real
        # weights): the page and /readyz say "loading", MQTT and Wyoming
        # requests get the `loading` error, Wyoming's describe is answered.
        await app.listen()
        if config.mqtt:
            from voice_agent.transports.mqtt import MqttTransport

            mqtt = MqttTransport(config, host, **mqtt_kwargs)
            await mqtt.start()
        if config.wyoming:
            from voice_agent.transports.wyoming import WyomingServer

            wyoming = WyomingServer(config, host)
            await wyoming.start()
        await app.start_engine()  # starts the engine, opens admission
        yield Services(app, mqtt, bus, store, host, wyoming)
    finally:
        try:
            host.begin_shutdown()
            try:
                if mqtt is not None:
                    await mqtt.close()
            finally:
                try:
                    if wyoming is not None:
                        await wyoming.close()  # its turns cancelled, conversations saved
                finally:
                    await app.shutdown()  # host.drain, host.close_sessions, close 1001
                    await host.close()
                    if close_engine:
                        await engine.close()
        finally:
            if store is not None:
                store.close()


def open_speech(config: Config) -> Speech | None:
    """The text to speech of `--tts` / `--tts-voice`, loaded and warmed up once
    (ConfigError when the chosen engine cannot run), or None for `none`."""
    tts = load_tts(config.tts, config.tts_voice)
    if tts is None:
        logger.info("replies are not spoken (--tts none)")
        return None
    speech = Speech(tts)
    speech.warm_up()
    logger.info("replies are spoken with %s", speech.name)
    return speech


def open_store(config: Config) -> Store | None:
    """The conversation store of `--db` (pruned once), or None for `none`."""
    path = resolve_db(config.db)
    if path is None:
        return None
    store = Store(
        path,
        store_audio=config.store_audio,
        retention_days=config.retention_days,
        max_sessions=config.max_stored_sessions,
    )
    pruned = store.prune()
    # location: the path, or the PostgreSQL URL without its password
    logger.info("conversation store %s", store.location, extra={"pruned": pruned})
    return store


async def serve_until_signal(config: Config, engine: Engine) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main = asyncio.current_task()
    serving = False

    def on_signal(signum: int) -> None:
        logger.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()
        for sig in _SIGNALS:  # a second signal gets the default behaviour
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if not serving and main is not None:
            main.cancel()  # still starting (the model loads): stop now, not after the load

    for sig in _SIGNALS:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, int(sig))

    speech = await asyncio.to_thread(open_speech, config)  # loads the voice off the loop
    try:
        async with running(config, engine, speech=speech) as services:
            serving = True
            freeze_startup_heap()
            app = services.app
            if engine.demo_model:
                logger.warning("serving the DEMO model: replies are random noise")
            logger.info(
                "serving %s (page, /healthz, /readyz, /metrics) and %s",
                app.http_url,
                app.url,
                extra={"model": engine.model_name},
            )
            if services.mqtt is not None:
                url = services.mqtt.url
                logger.info(
                    "MQTT on %s:%d, topics %s/DEVICE/ask",
                    url.host,
                    url.port,
                    config.mqtt_prefix,
                    extra={"devices_file": config.devices or ""},
                )
            if services.wyoming is not None:
                logger.info("Wyoming (Home Assistant) on %s", services.wyoming.url)
            await stop.wait()
    finally:
        for sig in _SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        if speech is not None:
            speech.close()
        logger.info("server stopped")


def freeze_startup_heap() -> None:
    """Move everything allocated so far (modules, the model's Python objects)
    out of the garbage collector's view (gc.freeze). The heap the sessions
    allocate is small; without this every full collection walks the whole
    start-up heap on the event loop, a stall of 100 ms and more under load."""
    gc.collect()
    gc.freeze()


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop `serve` runs on (Config.event_loop): uvloop's when asked
    for or, with `auto`, when installed; None means asyncio's default."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("event_loop uvloop: uvloop is not installed") from None
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(config: Config, engine: Engine) -> None:
    """Blocking entry point for `voice-agent serve`."""
    factory = loop_factory(config.event_loop)
    logger.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        try:
            runner.run(serve_until_signal(config, engine))
        except asyncio.CancelledError:  # a signal while starting up (serve_until_signal)
            logger.info("stopped while starting up")
