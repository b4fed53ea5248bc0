"""A real headless Chromium (Playwright) with a WAV file as its microphone,
driving the real page (web/) against a real server: launching it, the fake
microphone file, and reading the page by its data-testid attributes."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from voice_agent.transports.websocket import WebSocketServerApp

from .paths import ROOT

ARTIFACTS = ROOT / "test-artifacts"  # screenshots
CHROMIUM = "/usr/bin/chromium"
WAIT_MS = 45_000  # generous: 2-core machines, a CPU model


def require_browser_tools() -> None:
    """Chromium and sox are required (CI installs them): fail, never skip."""
    if not Path(CHROMIUM).exists():  # pragma: no cover
        pytest.fail(f"{CHROMIUM} is not installed (apt-get install chromium)")
    if shutil.which("sox") is None:  # pragma: no cover
        pytest.fail("sox is not installed (apt-get install sox)")


def chromium_args(fake_mic: Path, *, loop: bool = False) -> list[str]:
    """Flags for a headless Chromium with a file as its microphone, talking
    WebRTC over loopback only (the sandbox allows nothing else)."""
    capture = f"{fake_mic}" if loop else f"{fake_mic}%noloop"
    return [
        "--no-sandbox",
        "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={capture}",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-gpu",
        # ICE candidates on 127.0.0.1, not hidden behind mDNS names
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns",
        # the page's AudioContext runs without a user gesture
        "--autoplay-policy=no-user-gesture-required",
    ]


def make_fake_mic(
    parts: list[Path | float], out: Path, *, before: float = 1.0, after: float = 3.0
) -> Path:
    """The clips in `parts` (numbers: seconds of silence between them) as one
    48 kHz mono WAV with silence around it (what Chromium's fake capture device
    plays best). Clips must share a rate and channel count (the 16 kHz mono ones)."""
    inputs: list[str] = []
    for i, part in enumerate(parts):
        if isinstance(part, Path):
            inputs.append(str(part))
            continue
        gap = out.with_name(f"{out.stem}-gap{i}.wav")
        subprocess.run(
            ["sox", "-n", "-r", "16000", "-c", "1", "-b", "16", str(gap), "trim", "0", str(part)],
            check=True,
            capture_output=True,
        )
        inputs.append(str(gap))
    subprocess.run(
        [
            *("sox", *inputs, "-r", "48000", "-c", "1", "-b", "16", str(out)),
            *("pad", str(before), str(after)),
        ],
        check=True,
        capture_output=True,
    )
    return out


@asynccontextmanager
async def chromium(fake_mic: Path) -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=chromium_args(fake_mic)
        )
        try:
            yield browser
        finally:
            await browser.close()


class PageWatch:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page: Page) -> None:
        self.problems: list[str] = []
        self.console: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.problems.append(f"pageerror: {exc}"))

    def _console(self, msg: ConsoleMessage) -> None:
        self.console.append(f"{msg.type}: {msg.text}")
        if msg.type == "error":
            self.problems.append(f"console.error: {msg.text}")


async def watched_page(browser: Browser, *init_scripts: str) -> tuple[Page, PageWatch]:
    """A new page whose `init_scripts` run before the page's own; its console
    errors and uncaught exceptions are watched."""
    page = await browser.new_page()
    for script in init_scripts:
        await page.add_init_script(script)
    return page, PageWatch(page)


def tid(name: str) -> str:
    return f'[data-testid="{name}"]'


async def open_page(page: Page, server: WebSocketServerApp, query: str) -> str:
    """Load the page and wait for its session; returns the session id."""
    await page.goto(f"{server.http_url}{query}")
    return await session_of(page)


async def session_of(page: Page) -> str:
    """Wait for the page's session (connected, session.started); its id."""
    await page.wait_for_selector(f'{tid("connection")}[data-state="connected"]', timeout=WAIT_MS)
    await page.wait_for_function("() => Boolean(document.body.dataset.sessionId)", timeout=WAIT_MS)
    return str(await page.evaluate("() => document.body.dataset.sessionId"))


async def wait_reply_done(page: Page, reply_id: str) -> str:
    """The text of assistant turn `reply_id` once its reply.done arrived."""
    turn = page.locator(f'{tid("turn-assistant")}[data-reply-id="{reply_id}"][data-done="true"]')
    await turn.wait_for(timeout=WAIT_MS)
    return (await turn.locator(".body").inner_text()).strip()


async def type_turn(page: Page, text: str) -> None:
    await page.fill(tid("text-input"), text)
    await page.press(tid("text-input"), "Enter")


async def error_notices(page: Page) -> list[str]:
    return [t.strip() for t in await page.locator(f"{tid('errors')} .error").all_inner_texts()]


def server_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("voice_agent")
    ]
