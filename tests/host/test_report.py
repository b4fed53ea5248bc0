"""report(): counted by transport and code, mapped to the wire, one log line."""

from __future__ import annotations

import logging

import pytest

from voice_agent.errors import BadMessage, Busy, ServerFull
from voice_agent.host.report import report
from voice_agent.metrics import Metrics


def test_counts_by_transport_and_code() -> None:
    metrics = Metrics()
    report(Busy("engine busy"), transport="mqtt", metrics=metrics)
    report(Busy("engine busy"), transport="mqtt", metrics=metrics)
    report(BadMessage("no type"), transport="realtime", metrics=metrics)
    wire = report(ServerFull(), transport="realtime", metrics=metrics)
    assert (wire.code, wire.close_code) == ("server_full", 1013)
    assert metrics.errors_of("mqtt", "busy") == 2
    assert metrics.errors_of("realtime", "busy") == 0
    assert metrics.errors_of("realtime", "bad_message") == 1
    assert metrics.errors_of("realtime", "server_full") == 1
    text = metrics.render().decode()
    assert 'voice_agent_transport_errors_total{code="busy",transport="mqtt"} 2.0' in text
    # errors sent as error events/messages only: a close is not one
    assert 'voice_agent_errors_total{code="busy"} 2.0' in text
    assert metrics.errors_total == 3


def test_an_unexpected_exception_is_internal_and_logged_with_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voice_agent.host")
    metrics = Metrics()
    wire = report(KeyError("secret detail"), transport="realtime", metrics=metrics, session_id="s1")
    assert (wire.code, wire.message, wire.close_code) == ("internal", "internal server error", None)
    assert "secret" not in wire.message
    assert metrics.errors_of("realtime", "internal") == 1
    (line,) = [r for r in caplog.records if r.name == "voice_agent.host"]
    assert line.levelno == logging.ERROR and line.exc_info is not None
    assert getattr(line, "session_id", None) == "s1"


def test_a_client_error_is_one_info_line_without_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="voice_agent.host")
    report(BadMessage("bad"), transport="mqtt", device="kitchen", request_id="r1")
    (line,) = [r for r in caplog.records if r.name == "voice_agent.host"]
    assert line.levelno == logging.INFO and line.exc_info is None
    assert (getattr(line, "device", None), getattr(line, "code", None)) == (
        "kitchen",
        "bad_message",
    )
