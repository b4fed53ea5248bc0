"""A browser's own WebSocket (headless Chromium, a page of the server's
origin) speaking the OpenAI Realtime API as browser demos do: the key as the
`openai-insecure-api-key.KEY` subprotocol (browsers cannot set headers),
the `realtime` subprotocol selected, a typed turn answered. Every event the
page received is checked against the openai SDK's GA models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.openai_support import KEY, MODEL, finished, openai_server, schema_problem
from tests.helpers.browser import WAIT_MS, chromium
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180), pytest.mark.usefixtures("browser_tools")]

TURN = """async ({url, key, wait}) => {
  const ws = new WebSocket(url, ["realtime", "openai-insecure-api-key." + key]);
  const events = [];
  const done = new Promise((resolve, reject) => {
    ws.onmessage = (m) => {
      const event = JSON.parse(m.data);
      events.push(event);
      if (event.type === "response.done") resolve();
    };
    ws.onclose = (c) => reject(new Error("closed " + c.code));
    setTimeout(() => reject(new Error("no response.done")), wait);
  });
  await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = reject; });
  const send = (event) => ws.send(JSON.stringify(event));
  send({type: "session.update", session: {type: "realtime", output_modalities: ["text"]}});
  send({type: "conversation.item.create", item: {type: "message", role: "user",
        content: [{type: "input_text", text: "Hello from a browser"}]}});
  send({type: "response.create"});
  await done;
  const protocol = ws.protocol;
  ws.close();
  return {protocol, events};
}"""


async def test_a_browser_page_speaks_the_openai_protocol(
    tiny_engine: Qwen2AudioEngine, fake_mic: Path
) -> None:
    async with openai_server(tiny_engine) as app, chromium(fake_mic) as browser:
        page = await browser.new_page()
        await page.goto(f"http://127.0.0.1:{app.port}/healthz")  # the server's own origin
        url = f"ws://127.0.0.1:{app.port}/v1/realtime?model={MODEL}"
        result: dict[str, Any] = await page.evaluate(
            TURN, {"url": url, "key": KEY, "wait": WAIT_MS}
        )
    assert result["protocol"] == "realtime"
    events = result["events"]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "session.created", kinds
    for kind in ("session.updated", "conversation.item.added", "response.created"):
        assert kind in kinds, kinds
    assert [p for e in events if (p := schema_problem(e))] == []
    assert finished(events[-1]), events[-1]
