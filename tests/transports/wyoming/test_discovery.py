"""Zeroconf: --wyoming-zeroconf announces _wyoming._tcp (found by a real browser
on this host's mDNS), withdrawn at close; off by default."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.transports.wyoming.support import serving
from voice_agent.transports.wyoming.discovery import SERVICE_TYPE, service_name


def test_service_names_are_mdns_labels() -> None:
    assert service_name(10700, "my.host_name") == "voice_agent-my-host-name-10700"
    assert service_name(1, "").startswith("voice_agent-")
    assert len(service_name(65535, "x" * 200)) <= 63


async def test_announced_only_when_asked(tmp_path: Path) -> None:
    async with serving(tmp_path) as served:
        assert served.services.wyoming is not None
        assert served.services.wyoming.announcement is None


async def test_announced_and_found_then_withdrawn(tmp_path: Path) -> None:
    from zeroconf.asyncio import AsyncZeroconf

    async with serving(tmp_path, wyoming_zeroconf=True) as served:
        wyoming = served.services.wyoming
        assert wyoming is not None
        for _ in range(200):
            if wyoming.announcement is not None:
                break
            await asyncio.sleep(0.05)
        assert wyoming.announcement is not None
        browser = AsyncZeroconf()
        try:
            name = f"{service_name(wyoming.port)}.{SERVICE_TYPE}"
            info = None
            for _ in range(5):  # other mDNS responders on this host (other tests) may delay it
                info = await browser.async_get_service_info(SERVICE_TYPE, name, 3000)
                if info is not None:
                    break
            assert info is not None and info.port == wyoming.port
            assert "127.0.0.1" in info.parsed_addresses()
        finally:
            await browser.async_close()
    assert wyoming.announcement is None
