"""Continuation in the browser page, end to end on both audio transports
(WebRTC, the default, and WebSocket PCM): real headless Chromium whose fake
microphone says one sentence cut by a pause, a real server on loopback. The
reply to the first part is taken back while it streams, and the page shows
one user turn (the whole sentence, from the first part's start) and the one
answer to it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from tests.helpers.browser import (
    ARTIFACTS,
    WAIT_MS,
    chromium,
    error_notices,
    make_fake_mic,
    open_page,
    server_errors,
    tid,
    wait_reply_done,
    watched_page,
)
from voice_agent.audio import decode
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.transports.websocket import running_server

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(150),
    pytest.mark.usefixtures("browser_tools"),
]

CUT_MS = 940  # a quiet frame of ldc93s1, between "suit" and "in"
FRAGMENT_REPLY = " ".join(["I am answering only the first half of what you said."] * 6)
WHOLE_REPLY = "Got the whole sentence."


@pytest.fixture(scope="module")
def cut_mic(audio_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ldc93s1 cut at CUT_MS with 0.9 s of silence between the parts: the
    first part closes (0.6 s hangover) and speech resumes 0.3 s later."""
    out = tmp_path_factory.mktemp("fake-mic")
    audio = decode(audio_dir / "ldc93s1-16k-mono.wav")
    cut = CUT_MS * 16
    first, second = out / "first.wav", out / "second.wav"
    sf.write(str(first), audio[:cut].astype(np.float32), 16000, subtype="PCM_16")
    sf.write(str(second), audio[cut:].astype(np.float32), 16000, subtype="PCM_16")
    return make_fake_mic([first, 0.9, second], out / "cut-48k.wav", before=1.5, after=3.0)


@pytest.mark.parametrize("transport", ["webrtc", "ws"])
async def test_a_sentence_cut_by_a_pause_is_one_turn_in_the_page(
    transport: str, cut_mic: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    engine = ScriptedEngine([FRAGMENT_REPLY, WHOLE_REPLY], token_delay=0.1)
    config = Config(host="127.0.0.1", port=0, max_new_tokens=1000)
    query = "" if transport == "webrtc" else "?transport=ws"
    async with running_server(config, engine) as server, chromium(cut_mic) as browser:
        page, watch = await watched_page(browser)
        sid = await open_page(page, server, query)
        await page.click(tid("talk-button"))
        await page.wait_for_selector(f'{tid("talk-button")}[aria-pressed="true"]', timeout=WAIT_MS)
        assert await page.inner_text(tid("transport")) == transport

        assert await wait_reply_done(page, "r2") == WHOLE_REPLY
        # the reply to the fragment is gone from the page
        assert await page.locator(f'{tid("turn-assistant")}[data-reply-id="r1"]').count() == 0
        spoken = page.locator(f"{tid('turn-user')}[data-duration-ms]")
        assert await spoken.count() == 1
        assert await spoken.get_attribute("data-continues") == "u1"
        duration = int(await spoken.get_attribute("data-duration-ms") or 0)
        assert duration >= 2900  # both parts and the pause (2.9 s of speech and pause)
        order = await page.eval_on_selector_all(
            '[data-testid^="turn-"]', "els => els.map((e) => e.dataset.testid)"
        )
        assert order == ["turn-user", "turn-assistant"]
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(
            path=str(ARTIFACTS / f"browser-continuation-{transport}.png"), full_page=True
        )
        assert (sid in server.peers) == (transport == "webrtc")
        assert server.metrics.barge_ins_total == 0
        history = engine.history_text(server.sessions[sid].conversation)
        assert history.count("<|im_start|>user") == 1 and WHOLE_REPLY in history
        assert FRAGMENT_REPLY.split()[0] + " am" not in history
        assert await error_notices(page) == []
        assert watch.problems == [], watch.problems
    assert server_errors(caplog) == []
