"""The browser page end to end: real headless Chromium (Playwright) with a WAV
file as its fake microphone, against a real server on loopback serving the
real web/ directory.

Each transport (WebRTC, the default, and WebSocket PCM with ?transport=ws) is
driven through one conversation with the tiny Qwen2-Audio engine (flagged as
the demo model): speak (the fake mic plays a clip once), get a reply that
grows delta by delta, stop the mic, type a turn, reload the page and go on
with the same conversation, its earlier turns still shown. Barge-in runs on
both transports with the scripted engine, whose long, slow reply is still
streaming when the fake mic speaks again. Screenshots land in test-artifacts/.

The tiny model's replies are noise: those tests check what happens, never
what is said. No timings are asserted (see benchmarks/browser.py). A missing
Chromium or sox fails the tests: they are not optional.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.async_api import Page

from tests.helpers.browser import (
    ARTIFACTS,
    WAIT_MS,
    PageWatch,
    chromium,
    error_notices,
    open_page,
    server_errors,
    session_of,
    tid,
    type_turn,
    wait_reply_done,
    watched_page,
)
from voice_agent.config import Config
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine, words
from voice_agent.transports.websocket import running_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(150),
    pytest.mark.usefixtures("browser_tools"),
]


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir: Path) -> Iterator[Qwen2AudioEngine]:
    """One real engine for the module (greedy, 12 tokens); every server shares it.
    Loaded as the server loads its built-in demo model (demo_model=True)."""
    engine = Qwen2AudioEngine(
        str(tiny_model_dir), max_new_tokens=12, temperature=0.0, demo_model=True
    )
    engine.load()
    yield engine
    asyncio.run(engine.close())


@pytest.fixture
def config() -> Config:
    return Config(host="127.0.0.1", port=0, max_new_tokens=12)


# Every text an assistant turn's body showed, by reply id, in order: proof that
# a reply appears piece by piece, whatever its speed.
WATCH_REPLIES = """
window.__replyTexts = {};
new MutationObserver(() => {
  for (const li of document.querySelectorAll('[data-testid="turn-assistant"][data-reply-id]')) {
    if (li.dataset.restored) continue;
    const text = li.querySelector(".body").textContent;
    const seen = (window.__replyTexts[li.dataset.replyId] ||= []);
    if (seen[seen.length - 1] !== text) seen.push(text);
  }
}).observe(document, { childList: true, subtree: true, characterData: true });
"""


# The page's WebSockets, so a test can drop one as a network fault would.
KEEP_SOCKETS = """
window.__sockets = [];
window.WebSocket = class extends WebSocket {
  constructor(...args) {
    super(...args);
    window.__sockets.push(this);
  }
};
"""


async def reply_texts(page: Page, reply_id: str) -> list[str]:
    return list(await page.evaluate(f"() => window.__replyTexts[{reply_id!r}] || []"))


# ------------------------------------------------------------------ tests


def assert_grew(texts: list[str]) -> None:
    """The reply was shown piece by piece: a first non-empty text, then a longer
    one that continues it."""
    shown = [t for t in texts if t.strip()]
    assert shown, texts
    first = shown[0]
    assert any(len(t) > len(first) and t.startswith(first) for t in shown[1:]), texts


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
async def test_a_conversation_in_the_page(
    transport: str,
    config: Config,
    tiny_engine: Qwen2AudioEngine,
    fake_mic: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    query = "" if transport == "webrtc" else "?transport=ws"  # WebRTC is the default
    async with (
        running_server(config, tiny_engine, close_engine=False) as server,
        chromium(fake_mic) as browser,
    ):
        page, watch = await watched_page(browser, WATCH_REPLIES)
        sid = await open_page(page, server, query)
        assert sid in server.sessions
        assert await page.inner_text(tid("transport")) == "off"
        # the server said demo_model: the page says its replies are noise
        assert await page.is_visible(tid("demo-banner"))
        assert "demo model" in await page.inner_text(tid("demo-banner"))

        # Start: the fake mic plays the clip once; one user turn, a streamed reply
        await page.click(tid("talk-button"))
        await page.wait_for_selector(f'{tid("talk-button")}[aria-pressed="true"]', timeout=WAIT_MS)
        assert await page.inner_text(tid("talk-button")) == "Stop"
        assert await page.inner_text(tid("transport")) == transport, watch.console
        user = page.locator(f"{tid('turn-user')}[data-duration-ms]").first
        await user.wait_for(timeout=WAIT_MS)
        assert int(await user.get_attribute("data-duration-ms") or 0) > 1000  # a 2.9 s clip
        assert (await user.locator(".meta").inner_text()).endswith(" s")
        assert await user.locator("button.play").count() == 1  # play the utterance back
        first_reply = await wait_reply_done(page, "r1")
        assert first_reply
        assert_grew(await reply_texts(page, "r1"))
        r1 = page.locator(f'{tid("turn-assistant")}[data-reply-id="r1"]')
        assert int(await r1.get_attribute("data-deltas") or 0) >= 2
        # the server heard it, over the transport the page says it used
        assert server.metrics.utterances_total >= 1
        assert await page.inner_text(tid("transport")) == transport
        if transport == "webrtc":
            assert sid in server.peers  # the audio came in on the peer connection
        else:
            assert sid not in server.peers  # no offer was even made
        level = float(await page.get_attribute(tid("level-meter"), "value") or 0)
        assert 0.0 <= level <= 1.0

        # Stop: the mic is off, the conversation goes on, nothing went wrong
        await page.click(tid("talk-button"))
        await page.wait_for_selector(f'{tid("state")}[data-state="idle"]', timeout=WAIT_MS)
        assert await page.inner_text(tid("talk-button")) == "Start"
        assert await page.inner_text(tid("transport")) == "off"
        assert sid in server.sessions  # stopping the mic keeps the session

        # a typed turn is answered in the same conversation
        await type_turn(page, "What is on my calendar today?")
        await wait_reply_done(page, "r2")
        user_turns = await page.locator(tid("turn-user")).count()
        assert user_turns >= 2
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / f"browser-{transport}.png"), full_page=True)

        # reload: the page resumes the conversation (same session id, its earlier
        # turns still shown, reply ids and the server's history go on)
        await page.reload()
        assert await session_of(page) == sid
        assert list(server.sessions) == [sid]
        restored = page.locator('[data-testid^="turn-"][data-restored="true"]')
        assert await restored.count() >= 4  # voice turn, r1, typed turn, r2
        assert await page.locator(tid("turn-user")).count() == user_turns
        spoken = page.locator(f'{tid("turn-user")}[data-restored="true"][data-duration-ms]')
        assert await spoken.count() == 1
        old_r1 = page.locator(f'{tid("turn-assistant")}[data-reply-id="r1"][data-done="true"]')
        assert (await old_r1.locator(".body").inner_text()).strip() == first_reply
        typed = page.locator(f'{tid("turn-user")}[data-restored="true"] .body')
        assert "What is on my calendar today?" in await typed.all_inner_texts()
        assert await page.locator(tid("note")).count() == 0  # not a new conversation
        assert await page.is_visible(tid("demo-banner"))
        await type_turn(page, "And tomorrow?")
        await wait_reply_done(page, "r3")
        await page.screenshot(
            path=str(ARTIFACTS / f"browser-{transport}-reloaded.png"), full_page=True
        )

        assert await error_notices(page) == []
        assert watch.problems == [], watch.problems
        assert server.metrics.errors_total == 0
        assert server.metrics.turns_total == 3
        assert server.sessions[sid].conversation.turns == 3  # one history across the reload
    assert server_errors(caplog) == []


async def test_without_rtcpeerconnection_the_page_sends_pcm_over_the_websocket(
    config: Config, tiny_engine: Qwen2AudioEngine, fake_mic: Path
) -> None:
    """Also: on a phone-width screen, driven by the keyboard, found by its
    labels; and a dropped socket reconnects by itself into the same session."""
    async with (
        running_server(config, tiny_engine, close_engine=False) as server,
        chromium(fake_mic) as browser,
    ):
        page = await browser.new_page(viewport={"width": 360, "height": 740})
        await page.add_init_script("delete window.RTCPeerConnection;")
        await page.add_init_script(KEEP_SOCKETS)
        watch = PageWatch(page)
        sid = await open_page(page, server, "")
        # nothing sticks out sideways; every control is on screen
        width = await page.evaluate("() => document.documentElement.scrollWidth")
        assert width <= 360
        for name in ("talk-button", "text-input", "send-button", "level-meter", "state"):
            box = await page.locator(tid(name)).bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= 360, name
        # what a screen reader finds
        await page.get_by_role("button", name="Start").wait_for(timeout=WAIT_MS)
        await page.get_by_role("textbox", name="Type a message").wait_for(timeout=WAIT_MS)
        await page.get_by_role("meter", name="Mic level").wait_for(timeout=WAIT_MS)

        # keyboard only: the talk button is the first stop, Space presses it
        await page.keyboard.press("Tab")
        focused = await page.evaluate("() => document.activeElement.dataset.testid")
        assert focused == "talk-button"
        await page.keyboard.press("Space")
        await page.wait_for_selector(f'{tid("talk-button")}[aria-pressed="true"]', timeout=WAIT_MS)
        assert await page.inner_text(tid("transport")) == "ws"
        await page.locator(f"{tid('turn-user')}[data-duration-ms]").first.wait_for(timeout=WAIT_MS)
        await wait_reply_done(page, "r1")
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-phone-ws-fallback.png"))
        assert server.metrics.utterances_total == 1
        assert sid not in server.peers

        # the socket drops (no reload): the page reconnects by itself and resumes
        await page.evaluate("() => window.__sockets.at(-1).close(4000, 'test drop')")
        await page.wait_for_function("() => window.__sockets.length === 2", timeout=WAIT_MS)
        assert await session_of(page) == sid
        assert list(server.sessions) == [sid]
        assert server.metrics.sessions_total == 2  # a second connection, same conversation
        assert await page.locator(tid("note")).count() == 0  # not a new conversation
        assert await page.inner_text(tid("transport")) == "ws"  # the mic stayed on
        await type_turn(page, "Are you still there?")
        await wait_reply_done(page, "r2")
        assert server.sessions[sid].conversation.turns == 2

        assert server.metrics.errors_total == 0  # no offer was even sent
        assert await error_notices(page) == []
        assert watch.problems == []


LONG_REPLY = " ".join(
    f"Here is point number {i} of a very long answer that goes on and on." for i in range(1, 40)
)
SHORT_REPLY = "All right, I stopped."


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
async def test_speaking_over_a_streaming_reply_cuts_it_off(
    transport: str, config: Config, barge_in_mic: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # about 55 s of reply at 0.1 s a word: still streaming when the mic speaks again
    engine = ScriptedEngine([LONG_REPLY, SHORT_REPLY], token_delay=0.1)
    # barge-in as such: the second sentence comes 2.5 s after the first, within
    # the continuation window, which would join the two (test_browser_continuation.py)
    # the mic's first sentence is one turn (its pauses are under 600 ms), the second barges in
    config = dataclasses.replace(config, max_new_tokens=1000, continue_window_ms=0, hangover_ms=600)
    query = "" if transport == "webrtc" else "?transport=ws"
    async with running_server(config, engine) as server, chromium(barge_in_mic) as browser:
        page, watch = await watched_page(browser, WATCH_REPLIES)
        sid = await open_page(page, server, query)
        assert await page.is_hidden(tid("demo-banner"))  # the scripted engine is no demo
        await page.click(tid("talk-button"))
        await page.wait_for_selector(f'{tid("talk-button")}[aria-pressed="true"]', timeout=WAIT_MS)
        assert await page.inner_text(tid("transport")) == transport

        # the first sentence's reply streams, then the second sentence cuts it off
        cut = page.locator(f'{tid("turn-assistant")}[data-reply-id="r1"][data-cancelled="true"]')
        await cut.wait_for(timeout=WAIT_MS)
        assert await cut.get_attribute("data-reason") == "barge_in"
        assert await cut.get_attribute("data-done") is None
        assert "cut off" in await cut.locator(".cut-label").inner_text()
        assert await cut.locator(".cut-label").is_visible()
        said = (await cut.locator(".body").inner_text()).strip()
        assert said, "the reply was cut off before any of it was shown"
        assert LONG_REPLY.startswith(said)
        assert len(words(said)) < len(words(LONG_REPLY))
        assert_grew(await reply_texts(page, "r1"))

        # the second sentence is a user turn of its own, answered in full
        assert await wait_reply_done(page, "r2") == SHORT_REPLY
        spoken = page.locator(f"{tid('turn-user')}[data-duration-ms]")
        assert await spoken.count() == 2
        # page order: you, assistant (cut off), you (the barge-in), assistant
        order = await page.eval_on_selector_all(
            '[data-testid^="turn-"]', "els => els.map((e) => e.dataset.testid)"
        )
        assert order == ["turn-user", "turn-assistant", "turn-user", "turn-assistant"]
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(
            path=str(ARTIFACTS / f"browser-barge-in-{transport}.png"), full_page=True
        )

        assert server.metrics.barge_ins_total == 1
        assert sid in server.sessions
        assert (sid in server.peers) == (transport == "webrtc")
        assert await error_notices(page) == []
        assert watch.problems == [], watch.problems
    assert server_errors(caplog) == []


async def test_the_page_sends_the_token_from_the_url_fragment(
    config: Config, tiny_engine: Qwen2AudioEngine, fake_mic: Path
) -> None:
    # A server with --token: the page given #token=... gets a session; without
    # it the server closes with 1008 and the page says it was refused.
    config = dataclasses.replace(config, token="s3cret-token")
    async with (
        running_server(config, tiny_engine, close_engine=False) as server,
        chromium(fake_mic) as browser,
    ):
        page = await browser.new_page()
        sid = await open_page(page, server, "?transport=ws#token=s3cret-token")
        assert sid in server.sessions
        await page.fill(tid("text-input"), "hello")
        await page.keyboard.press("Enter")
        assert await wait_reply_done(page, "r1")

        refused = await browser.new_page()
        await refused.goto(f"{server.http_url}?transport=ws")
        await refused.wait_for_function(
            "() => document.body.textContent.includes('refused the connection')",
            timeout=WAIT_MS,
        )
        assert len(server.sessions) == 1
