"""The one exception tree, and the one place it maps to wire codes.

Every error a client can see is a subclass of VoiceAgentError. `to_wire`
turns any exception into (error code, client-safe message, close code or None).
Exception text of anything that is not a VoiceAgentError never reaches a client.

Errors that close a WebSocket (close code and reason, PROTOCOL.md):

    PolicyViolation     1008  missing or wrong token ("missing or wrong token")
    OriginRefused       1008  Origin not allowed ("origin not allowed")
    SlowClient          1008  the client stopped reading its events
    IdleTimeout         1000  no client message for idle_timeout seconds
    ShuttingDown        1001  the server is shutting down (admission and shutdown)
    ModelLoading        1013  the engine still loads ("the model is loading, ...";
                              the page matches "loading")
    ServerFull          1013  at max_sessions
    TooManyFromAddress  1013  at max_connections_per_client for that address

1009 (a frame over max_message_bytes) is sent by the WebSocket library itself
and 1011 by it for a handler that crashed; they are named here so that every
close code has one definition. The admission and close-only codes
(`loading`, `server_full`, `address_limit`, `shutting_down`, `slow_client`,
`idle`) never appear in an `error` event over WebSocket (the close reason
says it); they are the label errors are counted by.
"""

from __future__ import annotations

from dataclasses import dataclass

# WebSocket close codes (RFC 6455 and PROTOCOL.md).
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009  # sent by websockets itself (max_size = max_message_bytes)
CLOSE_INTERNAL = 1011  # sent by websockets itself when a handler crashes
CLOSE_TRY_AGAIN = 1013


class VoiceAgentError(Exception):
    """Base of every error the server raises on purpose.

    `code` is the protocol error code; `close_code` is set when the error ends
    the connection. The message must be safe to show to the client; without
    one, `reason` (the class's client-safe default) is used.
    """

    code: str = "internal"
    close_code: int | None = None
    reason: str = ""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message if message is not None else self.reason)


class BadMessage(VoiceAgentError):
    """Not JSON, no or unknown `type`, wrong field types."""

    code = "bad_message"


class InvalidField(BadMessage):
    """A message field is wrong; `param` names it (the OpenAI Realtime
    protocol's `error.param`, e.g. "session.audio.input.format")."""

    def __init__(self, message: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Unsupported(InvalidField):
    """A feature of another protocol this server does not offer (OpenAI
    Realtime tools and function calls, MCP, images, ...): refused by name,
    never ignored in silence."""

    code = "unsupported"


# Refusals of the OpenAI Realtime protocol under OpenAI's own codes (clients
# key on them: Pipecat ignores the first two, LiveKit the third).
class NoActiveResponse(InvalidField):
    code = "response_cancel_not_active"


class ResponseActive(InvalidField):
    code = "conversation_already_has_active_response"


class CommitEmpty(InvalidField):
    code = "input_audio_buffer_commit_empty"


class DuplicateItem(InvalidField):
    code = "item_create_duplicate_item_id"


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
    """Missing or wrong token: close 1008."""

    code = "policy"
    close_code = CLOSE_POLICY
    reason = "missing or wrong token"


class OriginRefused(PolicyViolation):
    """The handshake's Origin is not the server's page nor allowed: close 1008."""

    reason = "origin not allowed"


class SlowClient(VoiceAgentError):
    """The client stopped reading: its send queue is full. Close 1008."""

    code = "slow_client"
    close_code = CLOSE_POLICY
    reason = "client too slow: events not read"


class IdleTimeout(VoiceAgentError):
    """No client message for `idle_timeout` seconds while no reply ran: close 1000."""

    code = "idle"
    close_code = CLOSE_NORMAL
    reason = "idle timeout"


class ShuttingDown(VoiceAgentError):
    """The server is shutting down: close 1001."""

    code = "shutting_down"
    close_code = CLOSE_GOING_AWAY
    reason = "server shutting down"


class ModelLoading(VoiceAgentError):
    """The engine is still loading the model: close 1013 (try again later)."""

    code = "loading"
    close_code = CLOSE_TRY_AGAIN
    reason = "the model is loading, try again later"


class ServerFull(VoiceAgentError):
    """The server is at its session limit: close 1013."""

    code = "server_full"
    close_code = CLOSE_TRY_AGAIN
    reason = "server at its session limit, try again later"


class TooManyFromAddress(VoiceAgentError):
    """Too many connections from one client address: close 1013."""

    code = "address_limit"
    close_code = CLOSE_TRY_AGAIN
    reason = "too many connections from this address"


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


# Every code an `error` event or message can carry (PROTOCOL.md), then the
# close-only codes above: each is exported on /metrics from the start.
ERROR_CODES = (
    "bad_message",
    "unsupported",
    "response_cancel_not_active",
    "conversation_already_has_active_response",
    "input_audio_buffer_commit_empty",
    "item_create_duplicate_item_id",
    "not_started",
    "bad_audio",
    "busy",
    "policy",
    "internal",
)
CLOSE_ONLY_CODES = (
    "slow_client",
    "idle",
    "shutting_down",
    "loading",
    "server_full",
    "address_limit",
)


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
