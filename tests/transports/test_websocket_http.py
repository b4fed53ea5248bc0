"""Plain HTTP on the WebSocket port: static files, /healthz, /metrics, 404s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

from voice_agent.client import RealtimeClient
from voice_agent.protocol import ReplyDone
from voice_agent.transports.websocket import WebSocketServerApp, resolve_static

from . import ws_support
from .ws_support import http_get, scrape

pytestmark = pytest.mark.timeout(60)

# the fixtures of ws_support that the tests below use
web_dir = ws_support.web_dir
config = ws_support.config
app = ws_support.app


async def test_static_files_with_content_types(app: WebSocketServerApp) -> None:
    status, headers, body = await http_get(app.port, "/")
    assert status == 200 and b"voice agent" in body
    assert headers["content-type"].startswith("text/html")
    expected = {
        "/index.html": "text/html",
        "/js/app.js": "text/javascript",
        "/style.css": "text/css",
        "/icon.svg": "image/svg+xml",
        "/manifest.json": "application/json",
    }
    for path, kind in expected.items():
        status, headers, _ = await http_get(app.port, path)
        assert status == 200, path
        assert headers["content-type"].startswith(kind), path
        assert headers["x-content-type-options"] == "nosniff"
    status, _, body = await http_get(app.port, "/js/app.js?v=3")
    assert status == 200 and body == b"export const x = 1;\n"


async def test_healthz_and_metrics(app: WebSocketServerApp) -> None:
    status, headers, body = await http_get(app.port, "/healthz")
    assert status == 200 and headers["content-type"] == "application/json"
    assert json.loads(body) == {
        "status": "ok",
        "model": "scripted",
        "demo_model": False,
        "sessions": 0,
    }
    async with RealtimeClient(app.url) as client:
        await client.start()
        await client.send_text("hi")
        await client.wait_for(ReplyDone)
        _, _, body = await http_get(app.port, "/healthz")
        assert json.loads(body)["sessions"] == 1
        status, headers, _ = await http_get(app.port, "/metrics")
        metrics = await scrape(app.port)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert metrics["voice_agent_sessions_active"] == 1
    assert metrics["voice_agent_sessions_total"] == 1
    assert metrics["voice_agent_turns_total"] == 1
    assert {"voice_agent_utterances_total", "voice_agent_barge_ins_total"} <= set(metrics)
    assert metrics['voice_agent_errors_total{code="busy"}'] == 0
    # the transport's own counters and the host's, each exported once
    for name in (
        "auth_failures",
        "origin_refused",
        "slow_consumer_closes",
        "idle_closes",
        "throttled_seconds",
        "client_limit",
        "sessions_restored",
        "store_errors",
    ):
        assert metrics[f"voice_agent_{name}_total"] == 0, name


@pytest.mark.parametrize(
    "path",
    [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/..%2fsecret.txt",
        "/js/../../secret.txt",
        "/%2E%2E%5Csecret.txt",
        "/escape",
        "/.env",
        "/js/%00.js",
    ],
)
async def test_path_traversal_is_refused(app: WebSocketServerApp, path: str) -> None:
    status, _, body = await http_get(app.port, path)
    assert status == 404
    assert b"SECRET" not in body


def test_resolve_static(web_dir: Path) -> None:
    assert resolve_static(web_dir, "/") == (web_dir / "index.html").resolve()
    assert resolve_static(web_dir, "/js/app.js") == (web_dir / "js" / "app.js").resolve()
    assert resolve_static(web_dir, "/js/../index.html") is None
    assert resolve_static(web_dir, "/nope.js") is None
    assert resolve_static(web_dir / "missing", "/") is None


async def test_unknown_paths_are_404(app: WebSocketServerApp) -> None:
    for path in ("/nope", "/v1/other", "/v1/realtime/extra", "/js/missing.js"):
        status, _, _ = await http_get(app.port, path)
        assert status == 404, path
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(f"ws://127.0.0.1:{app.port}/v2/realtime"):
            pass
    assert info.value.response.status_code == 404
