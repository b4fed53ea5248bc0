"""deploy/compose.yaml and its overrides: ports, images, healthchecks, profiles."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.paths import ROOT

from .files import DEPLOY, GATEWAY_PORT, MODEL_ID, MODEL_PORT, load


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = load(DEPLOY / "compose.yaml")
    assert isinstance(data, dict)
    return data


def container_ports(service: dict[str, Any]) -> set[int]:
    """Container ports a compose service publishes or exposes ("127.0.0.1:8765:8765" -> 8765)."""
    ports = {int(str(p).split(":")[-1].split("/")[0]) for p in service.get("ports", [])}
    return ports | {int(p) for p in service.get("expose", [])}


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path (under deploy/) of a service's bind mounts."""
    mounts: dict[str, Path] = {}
    for v in service.get("volumes", []):
        if isinstance(v, str):
            source, target = v.split(":")[:2]
        else:
            if v.get("type") != "bind":
                continue
            source, target = v["source"], v["target"]
        if source.startswith("."):
            mounts[target] = (DEPLOY / source).resolve()
    return mounts


def healthcheck_url(service: dict[str, Any]) -> str:
    test = service["healthcheck"]["test"]
    text = test if isinstance(test, str) else " ".join(test)
    match = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", text)
    assert match, text
    return match.group(0)


def test_compose_agent_port_image_and_readiness_healthcheck(compose: dict[str, Any]) -> None:
    agent = compose["services"]["agent"]
    assert agent["build"]["dockerfile"] == "deploy/Dockerfile"
    context = (DEPLOY / agent["build"]["context"]).resolve()
    assert context == ROOT and (context / agent["build"]["dockerfile"]).is_file()
    assert agent["image"].startswith("voice-agent")
    assert container_ports(agent) == {GATEWAY_PORT}
    assert agent["environment"]["VOICE_AGENT_PORT"] == str(GATEWAY_PORT)
    assert healthcheck_url(agent) == f"http://127.0.0.1:{GATEWAY_PORT}/readyz"
    assert "/data" in " ".join(str(v) for v in agent["volumes"])


def test_compose_agent_reaches_the_broker_with_credentials_from_env(
    compose: dict[str, Any],
) -> None:
    agent = compose["services"]["agent"]
    url = agent["environment"]["VOICE_AGENT_MQTT"]
    assert url.startswith("mqtt://voice_agent:${MQTT_AGENT_PASSWORD")
    assert url.endswith("@mosquitto:1883")
    assert agent["depends_on"]["mosquitto"]["condition"] == "service_started"


def test_compose_mosquitto_denies_anonymous_and_mounts_acl_and_passwords(
    compose: dict[str, Any],
) -> None:
    broker = compose["services"]["mosquitto"]
    assert broker["image"].startswith("eclipse-mosquitto:2")
    assert container_ports(broker) == {1883}
    mounts = bind_mounts(broker)
    conf = mounts["/mosquitto/config/mosquitto.conf"]
    assert conf == (DEPLOY / "mosquitto" / "mosquitto.conf").resolve() and conf.is_file()
    settings = dict(
        line.split(None, 1)
        for line in conf.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert settings["allow_anonymous"] == "false"
    assert settings["listener"] == "1883"
    acl = mounts[settings["acl_file"]]
    assert acl.is_file() and "user voice_agent" in acl.read_text()
    # The password file holds hashes the operator makes: mounted, required, never committed.
    passwd = mounts[settings["password_file"]]
    assert passwd.parent == DEPLOY / "mosquitto"
    ignored = (passwd.parent / ".gitignore").read_text().split()
    assert passwd.name in ignored and passwd.name in (ROOT / ".dockerignore").read_text()
    spec = next(
        v
        for v in broker["volumes"]
        if isinstance(v, dict) and v["target"] == settings["password_file"]
    )
    assert spec["read_only"] is True and spec["bind"]["create_host_path"] is False


def test_compose_vllm_profile_serves_qwen2_audio_on_a_gpu(compose: dict[str, Any]) -> None:
    vllm = compose["services"]["vllm"]
    assert vllm["profiles"] == ["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    command = vllm["command"]
    assert command[command.index("--model") + 1] == MODEL_ID
    assert command[command.index("--port") + 1] == str(MODEL_PORT)
    assert container_ports(vllm) == {MODEL_PORT}
    assert healthcheck_url(vllm) == f"http://127.0.0.1:{MODEL_PORT}/health"
    (device,) = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert json.loads(command[command.index("--limit-mm-per-prompt") + 1])["audio"] >= 2


def test_compose_vllm_override_switches_the_agent_to_the_remote_engine(
    compose: dict[str, Any],
) -> None:
    override = load(DEPLOY / "compose.vllm.yaml")["services"]
    assert set(override) == {"agent"}
    args = override["agent"]["command"]
    assert args[args.index("--engine") + 1] == "openai"
    assert args[args.index("--engine-url") + 1] == f"http://vllm:{MODEL_PORT}/v1"
    assert args[args.index("--engine-model") + 1] == MODEL_ID
    assert override["agent"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert "vllm" in compose["services"]
    # the flags parse as `voice-agent serve` flags (the entrypoint prepends serve)
    from voice_agent.cli import build_parser

    parsed = build_parser().parse_args(["serve", *args])
    assert (parsed.engine, parsed.engine_url) == ("openai", f"http://vllm:{MODEL_PORT}/v1")


def test_compose_postgres_profile_is_optional_for_the_agent(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["profiles"] == ["postgres"]
    assert postgres["image"].startswith("postgres:")
    assert "pg_isready" in postgres["healthcheck"]["test"]
    dependency = compose["services"]["agent"]["depends_on"]["postgres"]
    assert dependency == {"condition": "service_healthy", "required": False}
    named = set(compose["volumes"])
    for service in compose["services"].values():
        for v in service.get("volumes", []):
            if isinstance(v, str) and not v.startswith("."):
                assert v.split(":")[0] in named
