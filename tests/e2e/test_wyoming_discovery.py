"""`--wyoming-zeroconf`: the server announces itself as `_wyoming._tcp` over
mDNS the way Home Assistant's Wyoming integration discovers services (its
zeroconf step takes the announced host and port and asks them `describe`),
and withdraws the announcement when it stops. Browsed with the `zeroconf`
package Home Assistant itself uses, bound to loopback only (the server
listens on 127.0.0.1, so that is where it announces); passed 10 runs of 10
here before it was committed (multicast on loopback)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from wyoming.client import AsyncTcpClient
from wyoming.info import Describe, Info
from zeroconf import ServiceStateChange
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from tests.e2e.wyoming_support import WAIT, read_until, wyoming_server
from voice_agent.engine.scripted import ScriptedEngine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SERVICE_TYPE = "_wyoming._tcp.local."


class Browser:
    """Every _wyoming._tcp change seen, waitable."""

    def __init__(self) -> None:
        self.zc = AsyncZeroconf(interfaces=["127.0.0.1"])  # loopback only
        self.changes: list[tuple[str, ServiceStateChange]] = []
        self._changed = asyncio.Event()
        self.browser = AsyncServiceBrowser(self.zc.zeroconf, [SERVICE_TYPE], handlers=[self._on])

    def _on(self, **kw: Any) -> None:
        self.changes.append((kw["name"], kw["state_change"]))
        self._changed.set()

    async def until(self, state: ServiceStateChange, names: set[str] | None = None) -> str:
        """The first service name (of `names`, if given) with that change."""
        async with asyncio.timeout(WAIT):
            while True:
                for name, change in self.changes:
                    if change == state and (names is None or name in names):
                        return name
                self._changed.clear()
                await self._changed.wait()

    async def close(self) -> None:
        await self.browser.async_cancel()
        await self.zc.async_close()


async def test_home_assistant_discovers_the_server() -> None:
    browser = Browser()
    try:
        ours: set[str] = set()
        address = ""
        async with wyoming_server(ScriptedEngine(["Hi."]), wyoming_zeroconf=True) as server:
            async with asyncio.timeout(WAIT):
                while not ours:  # other servers may announce too: ours has our port
                    name = await browser.until(ServiceStateChange.Added)
                    info = AsyncServiceInfo(SERVICE_TYPE, name)
                    for _ in range(3):  # resolving may take more than one query on a busy machine
                        if await info.async_request(browser.zc.zeroconf, 5000):
                            break
                    assert info.port is not None, name
                    if info.port == server.port:
                        ours.add(name)
                        address = info.parsed_addresses()[0]
                    browser.changes.remove((name, ServiceStateChange.Added))
            assert address == "127.0.0.1", address  # where it listens
            # Home Assistant's zeroconf step: describe at the announced address and port
            async with AsyncTcpClient(address, server.port) as client:
                await client.write_event(Describe().event())
                events = await read_until(client, "info")
            assert events and Info.is_type(events[-1].type), events
            assert Info.from_event(events[-1]).asr, events[-1].data
        await browser.until(ServiceStateChange.Removed, ours)  # withdrawn on the way out
    finally:
        await browser.close()
