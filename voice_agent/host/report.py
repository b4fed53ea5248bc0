"""One place where a transport reports an error: counted, logged, mapped to the wire.

`report(exc, transport=..., metrics=...)` returns errors.to_wire(exc) (the
client-safe code, message and close code) after:

- counting it in `voice_agent_transport_errors_total{transport,code}`, every
  error, admission refusals and other closes included;
- counting it in `voice_agent_errors_total{code}` when it goes to the client
  as an error event or message (no close code), the figure both transports
  always exported;
- one structured log line: `info` for what the client did (bad message, a
  refusal), `error` with the traceback for anything that is not a
  VoiceAgentError (a bug: the client only sees "internal server error").

Never the exception text of a non-VoiceAgentError on the wire, never audio or
text in the log.
"""

from __future__ import annotations

import logging

from voice_agent.errors import VoiceAgentError, WireError, to_wire
from voice_agent.metrics import Metrics

logger = logging.getLogger("voice_agent.host")


def report(
    exc: BaseException,
    *,
    transport: str,
    metrics: Metrics | None = None,
    session_id: str = "",
    device: str = "",
    request_id: str = "",
) -> WireError:
    """Count and log `exc`; what the client may see of it (see the module doc)."""
    wire = to_wire(exc)
    if metrics is not None:
        metrics.errors_by_transport.labels(transport, wire.code).inc()
        if wire.close_code is None:
            metrics.errors.labels(wire.code).inc()
    extra = {
        "transport": transport,
        "code": wire.code,
        "close_code": wire.close_code or 0,
        "session_id": session_id,
        "device": device,
        "request_id": request_id,
    }
    if isinstance(exc, VoiceAgentError):
        logger.info("error reported: %s", wire.code, extra=extra)
    else:
        logger.error(
            "unexpected error: %s",
            type(exc).__name__,
            exc_info=(type(exc), exc, exc.__traceback__),
            extra=extra,
        )
    return wire
