"""ICE for the WebRTC input (transports/webrtc.py): host candidates and STUN/TURN servers.

Host candidates follow the server's bind address. aioice, under aiortc,
gathers host candidates from `aioice.ice.get_host_addresses`, which lists
every interface address except loopback. A server listening on a loopback
address is reachable only from this machine, so its WebRTC media uses
loopback candidates only (`host_addresses_for_bind`), and only the offer's
loopback candidates are kept (`keep_candidates`). For that this module wraps
`aioice.ice.get_host_addresses` once (idempotently): the wrapper returns the
addresses set in a context variable (`host_candidates(...)`) and the normal
list when none is set, so other aiortc users in the process are not affected.

STUN/TURN servers come from `--ice-server` (none by default, so nothing
outside the LAN is contacted; aiortc's default Google STUN server is never
used). Each URL is checked at startup with aiortc's own parser
(`parse_ice_servers`), so a URL that aiortc would silently skip (`stuns:`,
an IPv6 literal, an unknown transport) is a ConfigError instead; aioice uses
at most one STUN and one TURN server.
"""

from __future__ import annotations

import contextlib
import contextvars
import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from urllib.parse import unquote

import aioice.ice
from aiortc import RTCConfiguration, RTCIceServer
from aiortc.rtcicetransport import parse_stun_turn_uri

from voice_agent.errors import ConfigError

ICE_SCHEMES = ("stun", "turn", "turns")  # aiortc ignores stuns:

# -- ICE host candidates -------------------------------------------------------

_HOST_ADDRESSES: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "voice_agent_ice_host_addresses", default=None
)
_HOOK_MARK = "_voice_agent_host_addresses_hook"


def install_host_address_hook() -> None:
    """Wrap `aioice.ice.get_host_addresses` (once) so that `host_candidates`
    can choose the host candidates.

    `Connection.gather_candidates` looks the function up in its module's
    globals at call time, so replacing the module attribute takes effect.
    aiortc gathers inside `setLocalDescription` (in tasks that copy the
    current context), so a context variable set around that call reaches it.
    """
    current = aioice.ice.get_host_addresses
    if getattr(current, _HOOK_MARK, False):
        return
    original = current

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        forced = _HOST_ADDRESSES.get()
        if forced is None:
            return original(use_ipv4, use_ipv6)
        return [a for a in forced if (use_ipv6 if ":" in a else use_ipv4)]

    setattr(get_host_addresses, _HOOK_MARK, True)
    aioice.ice.get_host_addresses = get_host_addresses


@contextlib.contextmanager
def host_candidates(addresses: Sequence[str] | None) -> Iterator[None]:
    """Peer connections negotiated (setLocalDescription) inside this block
    gather host candidates on `addresses` only (None: every interface but
    loopback, aioice's default)."""
    install_host_address_hook()
    token = _HOST_ADDRESSES.set(None if addresses is None else tuple(addresses))
    try:
        yield
    finally:
        _HOST_ADDRESSES.reset(token)


def loopback_candidates() -> contextlib.AbstractContextManager[None]:
    """`host_candidates(["127.0.0.1"])`: for a client of a loopback-bound server."""
    return host_candidates(["127.0.0.1"])


def host_addresses_for_bind(host: str) -> tuple[str, ...] | None:
    """The host candidates of a server listening on `host`: itself when it is a
    loopback address, None (every interface) otherwise."""
    if host == "localhost":
        return ("127.0.0.1",)
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (str(address),) if address.is_loopback else None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a name (mDNS .local) or garbage
        return False


def keep_candidates(sdp: str, allowed: tuple[str, ...] | None) -> str:
    """The offer with only loopback `a=candidate` lines when `allowed` (the
    server's loopback host addresses) is set; unchanged otherwise."""
    if allowed is None:
        return sdp
    lines = sdp.splitlines()
    kept = []
    for line in lines:
        if line.startswith("a=candidate:"):
            fields = line.split()
            if len(fields) < 6 or not _is_loopback(fields[4]):
                continue
        kept.append(line)
    return "\r\n".join(kept) + "\r\n"


# -- ICE servers ----------------------------------------------------------------


@dataclass(frozen=True)
class IceServer:
    """One `--ice-server` URL, split into what RTCIceServer takes."""

    url: str  # scheme:host[:port][?transport=...], without credentials
    username: str | None = None
    credential: str | None = None


def parse_ice_server(text: str) -> IceServer:
    """`stun:host[:port]` or `turn[s]:user:pass@host[:port][?transport=udp|tcp]`.

    User and password may be percent-encoded. ConfigError when malformed or
    when aiortc would silently ignore the server (`stuns:`, an IPv6 literal, a
    transport it does not support); the message never repeats the credentials.
    """
    scheme, sep, rest = text.strip().partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ICE_SCHEMES or not rest:
        raise ConfigError(
            "--ice-server must be stun:host[:port] or turn:user:pass@host[:port], "
            f"not {scheme!r}..."
        )
    username = credential = None
    if "@" in rest:
        if not scheme.startswith("turn"):
            raise ConfigError("--ice-server: only turn: URLs take user:pass@")
        creds, _, rest = rest.rpartition("@")
        user, has_pass, password = creds.partition(":")
        if not user or not has_pass:
            raise ConfigError("--ice-server: credentials must be user:pass@")
        username, credential = unquote(user), unquote(password)
    elif scheme.startswith("turn"):
        raise ConfigError("--ice-server: a turn: URL needs user:pass@")
    url = f"{scheme}:{rest}"
    try:
        parsed = parse_stun_turn_uri(url)  # what aiortc itself will parse
    except ValueError:
        raise ConfigError(
            f"--ice-server {url!r}: expected {scheme}:host[:port]"
            + ("[?transport=udp|tcp]" if scheme.startswith("turn") else "")
            + " (an IPv4 address or a name)"
        ) from None
    if not 0 < parsed["port"] < 65536:
        raise ConfigError(f"--ice-server {url!r}: the port must be 1 to 65535")
    transport = parsed.get("transport")
    if (scheme == "turn" and transport not in ("udp", "tcp")) or (
        scheme == "turns" and transport != "tcp"
    ):
        raise ConfigError(
            f"--ice-server {url!r}: turn: takes transport=udp or tcp, turns: only tcp"
        )
    return IceServer(url, username, credential)


def parse_ice_servers(urls: Sequence[str]) -> tuple[IceServer, ...]:
    """Every `--ice-server`; aioice takes at most one STUN and one TURN server."""
    servers = tuple(parse_ice_server(u) for u in urls)
    stun = [s for s in servers if s.url.startswith("stun")]
    turn = [s for s in servers if s.url.startswith("turn")]
    if len(stun) > 1 or len(turn) > 1:
        raise ConfigError("--ice-server: at most one STUN and one TURN server")
    return servers


def rtc_configuration(urls: Sequence[str]) -> RTCConfiguration:
    """The peer connection configuration; an explicit empty list when no ICE
    servers are configured (aiortc would use a public STUN server otherwise)."""
    servers = [
        RTCIceServer(urls=s.url, username=s.username, credential=s.credential)
        for s in parse_ice_servers(urls)
    ]
    return RTCConfiguration(iceServers=servers)
