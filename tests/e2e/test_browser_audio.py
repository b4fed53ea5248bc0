"""Spoken replies in the page: real headless Chromium against a real server
that speaks with espeak-ng (the scripted engine writes the replies).

- WebRTC: the server's outgoing track reaches the page's <audio> element,
  which plays it (not paused, the track live, inbound-rtp audio packets and
  audio energy counted by the browser), and no PCM comes over the socket.
- WebSocket (?transport=ws): the AudioWorklet player receives the binary
  frames and plays them (its counters on window.__voiceAgentPlayback).
- Speaking over a spoken reply stops its playback at once.
- The mute toggle (keyboard, aria-pressed, remembered) silences the page,
  tells the server at once (session.update) and makes session.start ask for
  text only.

No timings are asserted; every wait is bounded (WAIT_MS).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page

from tests.helpers.browser import (
    ARTIFACTS,
    WAIT_MS,
    chromium,
    error_notices,
    make_fake_mic,
    open_page,
    server_errors,
    session_of,
    tid,
    type_turn,
    wait_reply_done,
    watched_page,
)
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import running_server
from voice_agent.tts.espeak import EspeakTTS
from voice_agent.tts.speaker import Speech

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(150),
    pytest.mark.usefixtures("browser_tools"),
]

SPOKEN = "Sure, the kitchen light is on now. The living room stays dark, as you asked."
LONG_SPOKEN = " ".join(f"Here is point number {i} of a long spoken answer." for i in range(1, 40))
SHORT = "All right, I stopped."

# The page's peer connections, so a test can read their stats.
KEEP_PEERS = """
window.__pcs = [];
window.RTCPeerConnection = class extends RTCPeerConnection {
  constructor(...args) {
    super(...args);
    window.__pcs.push(this);
  }
};
"""

# Every JSON message the page sends.
KEEP_SENT = """
window.__sent = [];
const realSend = WebSocket.prototype.send;
WebSocket.prototype.send = function (data) {
  if (typeof data === "string") window.__sent.push(JSON.parse(data));
  return realSend.call(this, data);
};
"""

# What the browser counts for the received audio of the newest peer connection.
INBOUND_AUDIO = """
async () => {
  const pc = window.__pcs.at(-1);
  if (!pc) return null;
  for (const s of (await pc.getStats()).values()) {
    if (s.type === "inbound-rtp" && s.kind === "audio") {
      return {packets: s.packetsReceived || 0, bytes: s.bytesReceived || 0,
              energy: s.totalAudioEnergy || 0};
    }
  }
  return null;
}
"""

# The <audio> element really plays a live track.
ELEMENT_PLAYING = """
() => {
  const el = document.querySelector('[data-testid="reply-audio"]');
  const stream = el.srcObject;
  const track = stream ? stream.getAudioTracks()[0] : null;
  return Boolean(track && track.readyState === "live" && !el.paused && !el.muted
                 && el.dataset.playing === "true");
}
"""


def scripted(replies: Callable[[TurnInput], str]) -> ScriptedEngine:
    return ScriptedEngine(replies, token_delay=0.02)


@pytest.fixture
def config() -> Config:
    return Config(host="127.0.0.1", port=0, max_new_tokens=1000)


@pytest.fixture
async def speech() -> AsyncIterator[Speech]:
    s = Speech(EspeakTTS())
    yield s
    s.close()


async def playback(page: Page) -> dict[str, Any]:
    return dict(await page.evaluate("() => ({...window.__voiceAgentPlayback})"))


async def sent_starts(page: Page) -> list[dict[str, Any]]:
    sent = await page.evaluate("() => window.__sent")
    return [m for m in sent if m.get("type") == "session.start"]


async def test_webrtc_reply_plays_through_the_audio_element(
    config: Config,
    speech: Speech,
    fake_mic: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    engine = scripted(lambda turn: SPOKEN)
    async with (
        running_server(config, engine, speech=speech) as server,
        chromium(fake_mic) as browser,
    ):
        page, watch = await watched_page(browser, KEEP_PEERS)
        sid = await open_page(page, server, "")
        await page.click(tid("talk-button"))
        await page.wait_for_selector(
            f'{tid("transport")}[data-transport="webrtc"]', timeout=WAIT_MS
        )
        audio = page.locator(tid("reply-audio"))
        attached = f'{tid("reply-audio")}[data-source="webrtc"]'  # a hidden element
        await page.wait_for_selector(attached, state="attached", timeout=WAIT_MS)
        assert await audio.get_attribute("data-source") == "webrtc"

        # the fake mic speaks; the reply is written and spoken
        assert await wait_reply_done(page, "r1") == SPOKEN
        await page.wait_for_function(
            "() => window.__voiceAgentPlayback.replies >= 1", timeout=WAIT_MS
        )
        # the browser receives the track's packets, with sound in them...
        await page.wait_for_function(
            f"async () => {{ const s = await ({INBOUND_AUDIO})(); return s && s.energy > 0.001; }}",
            timeout=WAIT_MS,
            polling=200,
        )
        stats = await page.evaluate(INBOUND_AUDIO)
        assert stats["packets"] > 0 and stats["bytes"] > 0
        # ...and the <audio> element plays it (not paused, not muted, the track live)
        await page.wait_for_function(ELEMENT_PLAYING, timeout=WAIT_MS)
        assert await audio.get_attribute("data-playing") == "true"

        peer = server.peers[sid]
        assert peer.reply_track is not None and peer.reply_track.audio_frames_sent > 0
        played = await playback(page)
        assert played["samplesReceived"] == 0  # no PCM over the socket: it came on the track
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "browser-audio-webrtc.png"), full_page=True)
        assert await error_notices(page) == []
        assert watch.problems == [], watch.problems
    assert server_errors(caplog) == []


async def test_ws_reply_plays_through_the_worklet(
    config: Config,
    speech: Speech,
    fake_mic: Path,
) -> None:
    engine = scripted(lambda turn: SPOKEN)
    async with (
        running_server(config, engine, speech=speech) as server,
        chromium(fake_mic) as browser,
    ):
        page, watch = await watched_page(browser)
        await open_page(page, server, "?transport=ws")
        await type_turn(page, "Lights, please.")
        assert await wait_reply_done(page, "r1") == SPOKEN
        # more than a second of the reply played by the worklet
        await page.wait_for_function(
            "() => { const p = window.__voiceAgentPlayback;"
            " return p.contextRate > 0 && p.samplesPlayed > p.contextRate; }",
            timeout=WAIT_MS,
        )
        played = await playback(page)
        assert played["replies"] == 1
        assert played["samplesReceived"] > 16000  # over a second at 16 kHz came as frames
        assert played["stops"] == 0 and played["dropped"] == 0
        assert await page.get_attribute(tid("reply-audio"), "data-source") == "none"
        assert await error_notices(page) == []
        assert watch.problems == [], watch.problems


@pytest.fixture(scope="module")
def long_pause_barge_in_mic(audio_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence, a pause long enough for the spoken reply to be heard, then
    another sentence over it."""
    out = tmp_path_factory.mktemp("fake-mic") / "barge-in-spoken-48k.wav"
    first = audio_dir / "ldc93s1-16k-mono.wav"
    second = audio_dir / "new-home-in-the-stars-16k.wav"
    return make_fake_mic([first, 5.0, second], out, before=1.5, after=3.0)


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
async def test_speaking_over_the_spoken_reply_stops_it(
    transport: str,
    config: Config,
    speech: Speech,
    long_pause_barge_in_mic: Path,
) -> None:
    replies = iter([LONG_SPOKEN, SHORT])
    engine = ScriptedEngine(lambda turn: next(replies), token_delay=0.1)
    query = "" if transport == "webrtc" else "?transport=ws"
    async with (
        running_server(config, engine, speech=speech) as server,
        chromium(long_pause_barge_in_mic) as browser,
    ):
        page, watch = await watched_page(browser, KEEP_PEERS)
        sid = await open_page(page, server, query)
        await page.click(tid("talk-button"))
        audio = tid("reply-audio")
        # the long reply is being spoken (and, over the socket, played)
        await page.wait_for_selector(
            f'{audio}[data-reply-id="r1"]', state="attached", timeout=WAIT_MS
        )
        if transport == "ws":
            await page.wait_for_function(
                "() => window.__voiceAgentPlayback.samplesPlayed > 0", timeout=WAIT_MS
            )
        else:
            await page.wait_for_function(ELEMENT_PLAYING, timeout=WAIT_MS)

        # the second sentence: the page silences the reply as the user speaks
        cut = page.locator(f'{tid("turn-assistant")}[data-reply-id="r1"][data-cancelled="true"]')
        await cut.wait_for(timeout=WAIT_MS)
        assert await cut.get_attribute("data-reason") == "barge_in"
        played = await playback(page)
        assert played["stops"] >= 1
        if transport == "ws":
            # what the worklet had queued was dropped, not played on
            await page.wait_for_function(
                "() => window.__voiceAgentPlayback.queued === 0", timeout=WAIT_MS
            )
        else:
            peer = server.peers[sid]
            assert peer.reply_track is not None and peer.reply_track.buffered_ms == 0
        state = await page.get_attribute(audio, "data-state")
        muted = await page.evaluate(f"() => document.querySelector('{audio}').muted")
        # stopped and silent, unless the short answer to the barge-in already speaks
        assert (state == "stopped" and muted) or await page.get_attribute(
            audio, "data-reply-id"
        ) == "r2"
        assert await wait_reply_done(page, "r2") == SHORT
        assert await error_notices(page) == []
        assert watch.problems == [], watch.problems


async def test_the_mute_toggle_silences_the_page_and_asks_for_text_only(
    config: Config,
    speech: Speech,
    fake_mic: Path,
) -> None:
    engine = scripted(lambda turn: SPOKEN)
    async with (
        running_server(config, engine, speech=speech) as server,
        chromium(fake_mic) as browser,
    ):
        page, watch = await watched_page(browser, KEEP_SENT)
        await open_page(page, server, "?transport=ws")
        mute = page.get_by_role("button", name="Mute replies")
        assert await mute.get_attribute("aria-pressed") == "false"
        assert (await sent_starts(page))[-1]["speak"] is True

        # keyboard: the second stop after the talk button; Space toggles it
        await page.keyboard.press("Tab")
        await page.keyboard.press("Tab")
        focused = await page.evaluate("() => document.activeElement.dataset.testid")
        assert focused == "mute-button"
        await page.keyboard.press("Space")
        assert await mute.get_attribute("aria-pressed") == "true"
        stored = await page.evaluate("() => localStorage.getItem('voice_agent.muted')")
        assert stored == "1"
        assert await page.get_attribute(tid("reply-audio"), "data-muted") == "true"

        # the server is told at once (session.update): this session's replies
        # come as text only, and the page plays nothing
        sent = await page.evaluate("() => window.__sent")
        assert {"type": "session.update", "speak": False} in sent
        await type_turn(page, "Lights, please.")
        await wait_reply_done(page, "r1")
        assert (await playback(page))["replies"] == 0  # no reply.audio.started
        assert (await playback(page))["samplesPlayed"] == 0

        # the next session.start asks for text only: the server sends no audio
        await page.reload()
        sid = await session_of(page)
        assert await mute.get_attribute("aria-pressed") == "true"  # remembered
        assert (await sent_starts(page))[-1]["speak"] is False
        await type_turn(page, "And the kitchen?")
        await wait_reply_done(page, "r2")
        assert (await playback(page))["replies"] == 0  # no reply.audio.started at all
        assert server.sessions[sid].conversation.turns == 2

        # unmuted again: the next session asks for audio and plays it
        await mute.click()
        assert await mute.get_attribute("aria-pressed") == "false"
        await page.reload()
        await session_of(page)
        assert (await sent_starts(page))[-1]["speak"] is True
        await type_turn(page, "Thanks.")
        await wait_reply_done(page, "r3")
        await page.wait_for_function(
            "() => window.__voiceAgentPlayback.samplesPlayed > 0", timeout=WAIT_MS
        )
        assert await error_notices(page) == []
        assert watch.problems == [], watch.problems
