"""Wires config and engine to the transports; signals and graceful shutdown.

`run(config, engine)` is the CLI's blocking entry point: it serves the page,
/healthz, /metrics and /v1/realtime on one port until SIGINT or SIGTERM, then
stops accepting, cancels replies in flight, closes every connection with 1001
and closes the engine. A second signal during shutdown exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from voice_agent.config import Config
from voice_agent.engine.base import Engine
from voice_agent.transports.websocket import WebSocketServerApp

logger = logging.getLogger("voice_agent.server")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve_until_signal(config: Config, engine: Engine) -> None:
    """Serve until SIGINT/SIGTERM, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        logger.info("signal received, shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()
        for sig in _SIGNALS:  # a second signal gets the default behaviour
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    for sig in _SIGNALS:
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, on_signal, int(sig))

    app = WebSocketServerApp(config, engine)
    try:
        await app.start()
        if engine.demo_model:
            logger.warning("serving the DEMO model: replies are random noise")
        logger.info(
            "serving %s (page, /healthz, /metrics) and %s",
            app.http_url,
            app.url,
            extra={"model": engine.model_name},
        )
        await app.serve_forever(stop)
    finally:
        await app.shutdown()
        for sig in _SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        logger.info("server stopped")


def run(config: Config, engine: Engine) -> None:
    """Blocking entry point for `voice-agent serve`."""
    asyncio.run(serve_until_signal(config, engine))
