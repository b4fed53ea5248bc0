"""Access checks of the WebSocket transport: tokens and the handshake's Origin.

Checked in this order: an `Origin` header, when present, must be the server's
own page (scheme://Host, Host being an IP literal, `localhost` or the
configured host) or one of `allowed_origins`, else errors.OriginRefused
(close 1008); with tokens (`token`, `tokens_file`), session.start must carry
one of them (compared with hmac.compare_digest against every token), else
errors.PolicyViolation (close 1008). The owner of a conversation is a hash
of its token (never the token), so a conversation resumes only with the
token that opened it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from pathlib import Path
from urllib.parse import urlsplit

from voice_agent.config import Config
from voice_agent.errors import ConfigError, OriginRefused, PolicyViolation

logger = logging.getLogger("voice_agent.transports.websocket")


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
        raise PolicyViolation()
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Access:
    """The access rules of one server (tokens read once, at construction:
    ConfigError before anything listens); counts what it refuses."""

    def __init__(self, config: Config, *, tls: bool) -> None:
        self.config = config
        self.tokens = load_tokens(config)
        self.scheme = "https" if tls else "http"
        self.origin_refused = 0

    def check_origin(self, origin: str | None, host_header: str | None) -> None:
        """OriginRefused unless the handshake's Origin may go on."""
        if origin_allowed(
            origin,
            host_header,
            scheme=self.scheme,
            allowed=self.config.allowed_origins,
            server_host=self.config.host,
        ):
            return
        self.origin_refused += 1
        logger.warning("origin not allowed", extra={"origin": (origin or "")[:200]})
        raise OriginRefused()

    def owner(self, token: str | None) -> str:
        """The owner of a session.start's token, or PolicyViolation."""
        return check_token(token, self.tokens)

    def key_owner(self, key: str | None) -> str | None:
        """The owner of an OpenAI Realtime API key, checked like a token;
        None: refused (the handshake answers HTTP 401)."""
        try:
            return check_token(key, self.tokens)
        except PolicyViolation:
            return None
