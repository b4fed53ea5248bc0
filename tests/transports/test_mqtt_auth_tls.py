"""MQTT credentials and mqtts://."""

from __future__ import annotations

import logging
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import ROOT
from tests.helpers.tls import make_tls_files
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import BrokerAuthError, ConfigError
from voice_agent.transports.mqtt import MqttTransport

from . import mqtt_support
from .mqtt_support import (
    Broker,
    Listener,
    agent,
    echo,
    make_host,
    until,
)

pytestmark = pytest.mark.timeout(120)

# the fixtures of mqtt_support that the tests below use
broker = mqtt_support.broker
auth_broker = mqtt_support.auth_broker
tls_broker = mqtt_support.tls_broker


# ------------------------------------------------------- authentication


async def test_password_broker_with_and_without_credentials(auth_broker: Broker) -> None:
    good = Config(mqtt=auth_broker.url("agent:s3cret%3Apw"))
    async with agent(good, ScriptedEngine(echo)) as transport:
        assert transport.connected
    for url in (auth_broker.url(), auth_broker.url("agent:wrong")):
        engine = ScriptedEngine()
        await engine.start()
        config = Config(mqtt=url)
        transport = MqttTransport(config, make_host(config, engine))
        with pytest.raises(BrokerAuthError, match="refused the credentials"):
            await transport.start()
        assert not transport.connected
        await engine.close()


def test_cli_exits_with_one_line_without_credentials(
    auth_broker: Broker, tiny_model_dir: Path
) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "voice_agent.cli",
            "serve",
            "--model",
            str(tiny_model_dir),
            "--port",
            "0",
            "--mqtt",
            auth_broker.url(),
            "--log-level",
            "error",
        ],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    # one line, no traceback (model-loading progress bars may come before it)
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "voice-agent" in line]
    assert lines == [
        f"voice-agent: error: the MQTT broker at 127.0.0.1:{auth_broker.port} refused the "
        "credentials (none were given)"
    ], proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == lines[0]


# ------------------------------------------------------------------ mqtts://


async def test_mqtts_request_and_reply(tls_broker: Broker) -> None:
    ca = tls_broker.dir / "tls" / "ca.pem"
    config = Config(mqtt=tls_broker.url(), mqtt_ca=str(ca))
    assert config.mqtt is not None and config.mqtt.startswith("mqtts://")
    tls = ssl.create_default_context(cafile=str(ca))
    async with (
        agent(config, ScriptedEngine(echo)) as transport,
        Listener(tls_broker, tls=tls) as client,
    ):
        assert transport.url.tls
        await client.ask("kitchen", {"id": "tls-1", "text": "over tls"})
        reply = await client.reply("kitchen", "tls-1")
        assert reply["text"] == "you said over tls"


async def test_mqtts_wrong_ca_is_a_logged_error_and_retried(
    tls_broker: Broker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = tls_broker.url()
    with pytest.raises(ConfigError, match="--mqtt-ca"):
        missing = Config(mqtt=url, mqtt_ca=str(tmp_path / "missing.pem"))
        MqttTransport(missing, make_host(missing, ScriptedEngine()))
    other_ca = make_tls_files(tmp_path / "other")[0]  # a CA that did not sign the broker's
    caplog.set_level(logging.INFO, logger="voice_agent.mqtt")
    engine = ScriptedEngine()
    await engine.start()
    config = Config(mqtt=url, mqtt_ca=str(other_ca))
    transport = MqttTransport(
        config, make_host(config, engine), reconnect_min=0.05, reconnect_max=0.2
    )

    def untrusted() -> list[logging.LogRecord]:
        return [r for r in caplog.records if "not trusted" in r.getMessage()]

    try:
        await transport.start(first_connect_timeout=1.0)  # does not raise: retries
        await until(lambda: len(untrusted()) >= 3)
        assert not transport.connected and transport.stats.connections == 0
        task = transport.link.task
        assert task is not None and not task.done()  # still trying
        records = untrusted()
        assert all(r.levelno == logging.ERROR and r.exc_info is None for r in records)
        assert "--mqtt-ca" in records[0].getMessage()
        assert "CERTIFICATE_VERIFY_FAILED" in getattr(records[0], "reason", "")
        assert not any(r.exc_info for r in caplog.records if r.name == "voice_agent.mqtt")
    finally:
        await transport.close()
        await engine.close()
