"""logs.py: `--log-format json` lines from a real server session."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.logs import JsonFormatter
from voice_agent.protocol import ReplyDone
from voice_agent.transports.websocket import running_server

pytestmark = pytest.mark.timeout(60)

SAID = "purple giraffe passphrase"
REPLY = "Zebra crossing at midnight."


class Lines(logging.Handler):
    """Keeps every record as the json formatter writes it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture
def json_lines() -> Iterator[Lines]:
    handler = Lines()
    logger = logging.getLogger("voice_agent")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_json_lines_carry_extras_as_json_values() -> None:
    record = logging.makeLogRecord(
        {"name": "voice_agent.x", "levelname": "INFO", "msg": "saved %d", "args": (3,)}
    )
    record.session_id = "abc123"
    record.path = Path("/tmp/x")  # not a JSON type: written as its str()
    out = json.loads(JsonFormatter().format(record))
    assert out["msg"] == "saved 3" and out["level"] == "info" and out["logger"] == "voice_agent.x"
    assert out["session_id"] == "abc123" and out["path"] == "/tmp/x"
    assert out["ts"].endswith("Z")


async def test_session_log_lines_are_json_with_the_session_id_and_no_transcript(
    json_lines: Lines,
) -> None:
    config = Config(host="127.0.0.1", port=0, turn_detection="silence")
    engine = ScriptedEngine([REPLY], token_delay=0.001)
    async with running_server(config, engine) as app, RealtimeClient(app.url) as client:
        sid = (await client.start()).session_id
        await client.send_text(SAID)
        assert (await client.wait_for(ReplyDone)).text == REPLY
    records = [json.loads(line) for line in json_lines.lines]  # every line is one JSON object
    by_msg = {r["msg"]: r for r in records}
    assert by_msg["session started"]["session_id"] == sid
    assert by_msg["session ended"]["session_id"] == sid
    for line in json_lines.lines:  # neither what was said nor the reply
        assert "giraffe" not in line and "Zebra" not in line
