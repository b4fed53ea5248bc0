"""Zeroconf: --wyoming-zeroconf announces _wyoming._tcp (found by a real mDNS
browser, both on loopback only), withdrawn at close; off by default."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.transports.wyoming.support import serving
from voice_agent.transports.wyoming.discovery import (
    SERVICE_TYPE,
    announce,
    announce_interfaces,
    service_name,
)


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
        browser = AsyncZeroconf(interfaces=["127.0.0.1"])  # tests stay on loopback
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


async def test_a_registration_cancelled_while_probing_leaves_nothing_announced() -> None:
    from zeroconf.asyncio import AsyncZeroconf

    name = "voice_agent-cancelled-test"
    # zeroconf probes (about 1.25 s), registers and announces, and is done after its
    # second announcement (about 1.7 s): cancel in between, announced and not done.
    # On a machine fast enough to finish first, try earlier cancel points; the last
    # one (0.5 s, while probing) always finds it registering.
    for delay in (1.45, 1.35, 1.25, 0.5):
        task = asyncio.ensure_future(announce("127.0.0.1", 10709, name))
        await asyncio.sleep(delay)
        if not task.done():
            break
        announcement = task.result()
        if announcement is not None:
            await announcement.close()
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    browser = AsyncZeroconf(interfaces=["127.0.0.1"])  # tests stay on loopback
    try:
        info = await browser.async_get_service_info(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", 2000)
        assert info is None  # nothing answers for it
    finally:
        await browser.async_close()


async def test_withdrawn_at_close() -> None:
    from zeroconf.asyncio import AsyncZeroconf

    name = "voice_agent-withdrawn-test"
    announcement = await announce("127.0.0.1", 10708, name)
    assert announcement is not None
    await announcement.close()
    browser = AsyncZeroconf(interfaces=["127.0.0.1"])  # tests stay on loopback
    try:
        info = await browser.async_get_service_info(SERVICE_TYPE, f"{name}.{SERVICE_TYPE}", 2000)
        assert info is None
    finally:
        await browser.async_close()


def test_mdns_runs_on_the_listening_address_only() -> None:
    from zeroconf import InterfaceChoice

    assert announce_interfaces("127.0.0.1", "127.0.0.1") == ["127.0.0.1"]
    assert announce_interfaces("0.0.0.0", "192.0.2.2") is InterfaceChoice.All
