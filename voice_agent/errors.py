"""The one exception tree, and the one place it maps to wire codes.

Every error a client can see is a subclass of VoiceAgentError. `to_wire`
turns any exception into (error code, client-safe message, close code or None).
Exception text of anything that is not a VoiceAgentError never reaches a client.
"""

from __future__ import annotations

from dataclasses import dataclass

# WebSocket close codes (RFC 6455 and PROTOCOL.md).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_AGAIN = 1013


class VoiceAgentError(Exception):
    """Base of every error the server raises on purpose.

    `code` is the protocol error code; `close_code` is set when the error ends
    the connection. The message must be safe to show to the client.
    """

    code: str = "internal"
    close_code: int | None = None


class BadMessage(VoiceAgentError):
    """Not JSON, no or unknown `type`, wrong field types."""

    code = "bad_message"


class NotStarted(VoiceAgentError):
    """Anything but `session.start` before the session started."""

    code = "not_started"


class BadAudio(VoiceAgentError):
    """Odd byte count, unsupported rate or channels, undecodable or empty audio."""

    code = "bad_audio"


class Busy(VoiceAgentError):
    """A bounded queue is full: the request is refused, nothing else is lost."""

    code = "busy"


class PolicyViolation(VoiceAgentError):
    """Missing or wrong token, origin not allowed: close 1008."""

    code = "policy"
    close_code = CLOSE_POLICY


class FrameTooLarge(VoiceAgentError):
    """A frame over the configured limit: close 1009."""

    code = "too_large"
    close_code = CLOSE_TOO_BIG


class ServerFull(VoiceAgentError):
    """The server is at its session limit: close 1013."""

    code = "busy"
    close_code = CLOSE_TRY_AGAIN


class EngineError(VoiceAgentError):
    """The model failed on one turn; only that turn fails."""

    code = "internal"


class BackendUnavailable(EngineError):
    """The remote model backend (engine openai) is down, unreachable or timed out;
    only that turn fails, the next one tries again."""

    code = "internal"


class ModelLoadError(VoiceAgentError):
    """A model could not be loaded; the message says what failed and how to fix it."""

    code = "internal"


class ConfigError(VoiceAgentError):
    """A configuration value is invalid."""

    code = "internal"


class TtsError(VoiceAgentError):
    """Speech synthesis failed (the reply's text still arrives; its audio ends)."""

    code = "internal"


class BrokerAuthError(ConfigError):
    """The MQTT broker refused the agent's credentials: the server cannot start."""


@dataclass(frozen=True)
class WireError:
    code: str
    message: str
    close_code: int | None


def to_wire(exc: BaseException) -> WireError:
    """Map any exception to what the client may see. The single mapping point."""
    if isinstance(exc, VoiceAgentError):
        message = str(exc) or exc.code.replace("_", " ")
        return WireError(exc.code, message, exc.close_code)
    return WireError("internal", "internal server error", None)
