"""The page while the server turns its sessions away (close 1013, "try again
later"), in real headless Chromium (Playwright, /usr/bin/chromium) against a
real server on loopback serving the real web/ directory:

- the model is still loading (DeferredEngine whose load blocks until the test
  releases it): the page says "The model is loading (N s so far)" with the
  server's time (/readyz loading_s), never "session limit", and connects by
  itself once the load is done;
- the server is at max_sessions: the page says "session limit", never
  "loading", and connects once the slot is free.

Only what is shown is asserted, with generous waits: no timings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from playwright.async_api import Page, async_playwright

from tests.helpers.browser import CHROMIUM, WAIT_MS
from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.deferred import DeferredEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import WebSocketServerApp, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150), pytest.mark.usefixtures("browser_tools")]

STATUS = '[data-testid="server-status"]'
CONNECTION = '[data-testid="connection"]'
LOADING = re.compile(r"The model is loading \((\d+) s so far\)")
ARGS = [  # no microphone: nothing is spoken here
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def config() -> Config:
    return Config(host="127.0.0.1", port=0, max_new_tokens=12, tts="none", db="none")


@asynccontextmanager
async def page_for(url: str) -> AsyncIterator[Page]:
    """A headless Chromium page on `url` (WebSocket audio: no WebRTC needed)."""
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"{url}?transport=ws&speak=0")
            yield page
        finally:
            await browser.close()


async def status_text(page: Page) -> str:
    return await page.inner_text(STATUS)


async def wait_connected(page: Page) -> None:
    await page.wait_for_selector(f'{CONNECTION}[data-state="connected"]', timeout=WAIT_MS)
    await page.wait_for_selector(STATUS, state="hidden", timeout=WAIT_MS)


def readyz(app: WebSocketServerApp) -> dict[str, object]:
    try:
        with urllib.request.urlopen(f"{app.http_url}readyz", timeout=10) as resp:
            body: dict[str, object] = json.load(resp)
    except urllib.error.HTTPError as err:  # 503 while loading: the body says why
        body = json.load(err)
    return body


async def listening(app: WebSocketServerApp) -> None:
    async with asyncio.timeout(30):
        while True:
            try:
                app.port  # noqa: B018 (raises until it listens)
                return
            except RuntimeError:
                await asyncio.sleep(0.02)


async def test_the_page_says_the_model_is_loading_then_connects(config: Config) -> None:
    release = threading.Event()

    def load() -> ScriptedEngine:  # the slow model load (loader.load_engine)
        assert release.wait(120)
        return ScriptedEngine(["hello"], token_delay=0.001)

    app = WebSocketServerApp(config, DeferredEngine(load, "slow/model", progress_every=60))
    start = asyncio.create_task(app.start())
    try:
        await listening(app)
        # Let the load run a while first: the page must show the server's time
        # (loading_s), not count from when it was opened.
        async with asyncio.timeout(60):
            while float(str((await asyncio.to_thread(readyz, app)).get("loading_s", 0))) < 3:
                await asyncio.sleep(0.2)
        async with page_for(app.http_url) as page:
            await page.wait_for_selector(f'{STATUS}[data-kind="loading"]', timeout=WAIT_MS)
            text = await status_text(page)
            shown = LOADING.search(text)
            assert shown, text
            first = int(shown.group(1))
            assert first >= 3, text
            assert "session limit" not in text
            # the time goes on while it loads
            await page.wait_for_function(
                """([sel, first]) => {
                  const m = document.querySelector(sel).textContent.match(/\\((\\d+) s so far/);
                  return m && Number(m[1]) > first;
                }""",
                arg=[STATUS, first],
                timeout=WAIT_MS,
            )
            assert await page.get_attribute(CONNECTION, "data-state") != "connected"

            release.set()
            await asyncio.wait_for(start, 30)
            await wait_connected(page)  # by itself: /readyz said ready
            assert not await page.is_visible(STATUS)
    finally:
        release.set()
        await asyncio.gather(start, return_exceptions=True)
        await app.shutdown()


async def test_the_page_says_the_server_is_full_then_connects(config: Config) -> None:
    full = dataclasses.replace(config, max_sessions=1)
    async with running_server(full, ScriptedEngine(["hello"], token_delay=0.001)) as app:
        holder = RealtimeClient(app.url)
        await holder.connect()
        await holder.start()  # the one session there is room for
        try:
            async with page_for(app.http_url) as page:
                await page.wait_for_selector(f'{STATUS}[data-kind="full"]', timeout=WAIT_MS)
                text = await status_text(page)
                assert "The server is at its session limit" in text
                assert "loading" not in text.lower()
                assert await page.get_attribute(CONNECTION, "data-state") != "connected"

                await holder.close()  # the slot is free: the page's retry gets in
                await wait_connected(page)
        finally:
            await holder.close()
