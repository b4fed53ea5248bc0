"""Zeroconf (mDNS): announce the Wyoming server as `_wyoming._tcp`, the way
Home Assistant's Wyoming integration discovers services (--wyoming-zeroconf).

zeroconf is imported only here and only when the announcement is asked for
(the `wyoming` extra). mDNS runs on the server's own address when it listens
on one (tcp://127.0.0.1:... announces on loopback only), on every interface
for tcp://0.0.0.0:.... Announcing fails soft: a network without multicast is
logged and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import Any

logger = logging.getLogger("voice_agent.wyoming")

SERVICE_TYPE = "_wyoming._tcp.local."
MDNS_GROUP = "224.0.0.251"


def service_name(port: int, hostname: str | None = None) -> str:
    """An mDNS instance name for the server on `port` of this host:
    voice_agent-HOSTNAME-PORT (unique per host; letters, digits and '-'
    only, at most 63 characters)."""
    host = re.sub(r"[^A-Za-z0-9-]+", "-", hostname or socket.gethostname()).strip("-")
    return f"voice_agent-{host[:40] or 'server'}-{port}"


def announce_address(host: str) -> str:
    """The IPv4 address to announce for a server listening on `host`: itself,
    or for a wildcard the address this host reaches the mDNS group from."""
    if host not in ("", "0.0.0.0", "::"):
        try:
            return socket.gethostbyname(host)
        except OSError:
            return host
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect((MDNS_GROUP, 1))  # no packet is sent: this only picks the interface
        address: str = probe.getsockname()[0]
        return address
    finally:
        probe.close()


async def _withdraw_all(zeroconf: Any) -> None:
    try:
        await zeroconf.async_unregister_all_services()
    except Exception as exc:
        logger.warning("zeroconf: withdrawing the service failed: %s", type(exc).__name__)
    await zeroconf.async_close()


def announce_interfaces(host: str, address: str) -> Any:
    """Where mDNS runs: only the server's own address when it listens on one
    (127.0.0.1 stays on loopback), every interface for a wildcard host."""
    from zeroconf import InterfaceChoice

    if host in ("", "0.0.0.0", "::"):
        return InterfaceChoice.All
    return [address]


class Announcement:
    """One registered service; `await close()` withdraws it."""

    def __init__(self, zeroconf: Any, info: Any) -> None:
        self._zeroconf = zeroconf
        self._info = info

    async def close(self) -> None:
        try:
            goodbye = await self._zeroconf.async_unregister_service(self._info)
            await goodbye  # the goodbye packets are out
        except Exception as exc:
            logger.warning("zeroconf: withdrawing the service failed: %s", type(exc).__name__)
        await self._zeroconf.async_close()


async def announce(host: str, port: int, name: str | None = None) -> Announcement | None:
    """Register `name`._wyoming._tcp.local. at (host, port); None when it failed (logged)."""
    from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

    instance = name or service_name(port)
    zeroconf: Any = None
    try:
        address = announce_address(host)
        info = AsyncServiceInfo(
            SERVICE_TYPE,
            f"{instance}.{SERVICE_TYPE}",
            addresses=[socket.inet_aton(address)],
            port=port,
        )
        zeroconf = AsyncZeroconf(interfaces=announce_interfaces(host, address))
        registering = await zeroconf.async_register_service(info)
        await registering
    except BaseException as exc:
        # Failed or cancelled while probing: nothing may stay announced.
        if zeroconf is not None:
            await asyncio.shield(_withdraw_all(zeroconf))
        if not isinstance(exc, Exception):
            raise
        logger.warning("zeroconf: announcing the Wyoming service failed: %s", type(exc).__name__)
        return None
    logger.info("zeroconf: announced %s at %s:%d", instance, address, port)
    return Announcement(zeroconf, info)
