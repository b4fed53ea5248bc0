"""deploy/: the compose and Kubernetes files parse and agree with the server (ports, probes,
images, GPU requests), the mosquitto ACL does what it says on a real broker, the Dockerfiles
point at the entrypoint, and the entrypoint works as a plain command."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
VENV_BIN = Path(sys.executable).parent
GATEWAY_PORT = 8765
MODEL_PORT = 8000
MODEL_ID = "Qwen/Qwen2-Audio-7B-Instruct"
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- compose ----------------------------------------------------------------


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


# -- the broker's ACL, on a real mosquitto -----------------------------------


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[int]:
    """deploy/mosquitto/mosquitto.conf on a loopback port, with deploy/mosquitto/acl as
    is and a password file for the agent, Home Assistant and two devices."""
    if not Path(MOSQUITTO).exists():
        pytest.fail("mosquitto is not installed (Debian package `mosquitto`)")
    passwd = tmp_path / "passwd"
    passwd.write_text("")
    for user in ("voice_agent", "homeassistant", "kitchen", "hall"):
        subprocess.run(
            [MOSQUITTO_PASSWD, "-b", str(passwd), user, f"pw-{user}"],
            check=True,
            capture_output=True,
        )
    passwd.chmod(0o600)
    port = free_port()
    lines = []
    for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        key = line.split(None, 1)[0] if line.strip() else ""
        replaced = {
            "listener": f"listener {port} 127.0.0.1",
            "password_file": f"password_file {passwd}",
            "acl_file": f"acl_file {DEPLOY / 'mosquitto' / 'acl'}",
            "persistence_location": f"persistence_location {tmp_path}/",
            "log_dest": f"log_dest file {tmp_path}/mosquitto.log",
        }
        lines.append(replaced.get(key, line))
    if os.geteuid() == 0:
        lines.append("user root")  # keep root: tmp_path is not the mosquitto user's
    conf = tmp_path / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(200):  # up to 10 s
            if proc.poll() is not None:
                log = (tmp_path / "mosquitto.log").read_text(errors="replace")[-2000:]
                pytest.fail(f"mosquitto exited with {proc.returncode}: {log}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        else:
            pytest.fail("mosquitto did not listen within 10 s")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def client(port: int, user: str | None) -> aiomqtt.Client:
    return aiomqtt.Client(
        "127.0.0.1",
        port,
        username=user,
        password=f"pw-{user}" if user else None,
        identifier=f"{user}-{uuid.uuid4().hex[:8]}",
    )


async def first_message(c: aiomqtt.Client) -> tuple[str, bytes]:
    async with asyncio.timeout(10):
        async for message in c.messages:
            return str(message.topic), bytes(message.payload)  # type: ignore[arg-type]
    raise AssertionError("no message")


async def test_mosquitto_acl_lets_each_user_use_only_its_topics(broker: int) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with client(broker, None):
            pass  # anonymous: refused
    async with (
        client(broker, "voice_agent") as agent,
        client(broker, "kitchen") as kitchen,
        client(broker, "homeassistant") as ha,
    ):
        await agent.subscribe("voice_agent/+/ask", qos=1)
        # a device asks only as itself: the forged request is dropped, its own arrives
        await kitchen.publish("voice_agent/hall/ask", b"forged", qos=1)
        await kitchen.publish("voice_agent/kitchen/ask", b"real", qos=1)
        assert await first_message(agent) == ("voice_agent/kitchen/ask", b"real")
        # Home Assistant asks on behalf of any device
        await ha.publish("voice_agent/doorbell/ask", b"ding", qos=1)
        assert await first_message(agent) == ("voice_agent/doorbell/ask", b"ding")

        # a device hears only its own replies and commands, and only the agent's
        for topic in ("voice_agent/hall/reply", "voice_agent/kitchen/reply"):
            await kitchen.subscribe(topic, qos=1)
        await kitchen.subscribe("voice_agent/kitchen/command", qos=1)
        await agent.publish("voice_agent/hall/reply", b"not yours", qos=1)
        await ha.publish("voice_agent/kitchen/command", b"forged by ha", qos=1)
        await agent.publish("voice_agent/kitchen/command", b"light on", qos=1)
        assert await first_message(kitchen) == ("voice_agent/kitchen/command", b"light on")

        # the agent publishes its Home Assistant discovery, which Home Assistant reads
        await ha.subscribe("homeassistant/#", qos=1)
        await agent.publish("homeassistant/binary_sensor/voice_agent/status/config", b"{}", qos=1)
        assert await first_message(ha) == (
            "homeassistant/binary_sensor/voice_agent/status/config",
            b"{}",
        )


# -- Kubernetes ---------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    """(kind, name) -> object, for every manifest kustomization.yaml lists."""
    kustomization = load(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    objects: dict[tuple[str, str], dict[str, Any]] = {}
    for name in sorted(listed):
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            assert "namespace" not in doc["metadata"], name
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def one_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def probe_port(container: dict[str, Any], probe: str) -> int:
    """The container port a probe checks (a port name resolved to its number)."""
    port = container[probe]["httpGet"]["port"]
    if isinstance(port, int):
        return port
    return int(next(p["containerPort"] for p in container["ports"] if p["name"] == port))


def service_target(service: dict[str, Any], deployment: dict[str, Any]) -> int:
    (port,) = service["spec"]["ports"]
    target = port["targetPort"]
    if isinstance(target, int):
        return target
    ports = one_container(deployment)["ports"]
    return int(next(p["containerPort"] for p in ports if p["name"] == target))


def selects(service: dict[str, Any], deployment: dict[str, Any]) -> bool:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = service["spec"]["selector"]
    return all(labels.get(k) == v for k, v in selector.items()) and all(
        labels.get(k) == v for k, v in deployment["spec"]["selector"]["matchLabels"].items()
    )


def test_k8s_gateway_probes_port_and_resources(k8s: dict[tuple[str, str], Any]) -> None:
    gateway = k8s[("Deployment", "voice-agent-gateway")]
    container = one_container(gateway)
    assert container["image"].startswith("voice-agent")
    assert [p["containerPort"] for p in container["ports"]] == [GATEWAY_PORT]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_port(container, probe) == GATEWAY_PORT
    resources = container["resources"]
    assert set(resources["requests"]) >= {"cpu", "memory"}
    assert set(resources["limits"]) >= {"cpu", "memory"}
    assert "nvidia.com/gpu" not in resources["limits"]
    pod = gateway["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert any(m["mountPath"] == "/data" for m in container["volumeMounts"])


def test_k8s_gateway_config_and_secret_exist(k8s: dict[tuple[str, str], Any]) -> None:
    container = one_container(k8s[("Deployment", "voice-agent-gateway")])
    config_name = next(
        s["configMapRef"]["name"] for s in container["envFrom"] if "configMapRef" in s
    )
    secret_name = next(s["secretRef"]["name"] for s in container["envFrom"] if "secretRef" in s)
    config = k8s[("ConfigMap", config_name)]["data"]
    assert config["VOICE_AGENT_PORT"] == str(GATEWAY_PORT)
    assert config["VOICE_AGENT_HOST"] == "0.0.0.0"
    # every key is a real option, and every value parses
    from voice_agent.config import Config

    config_obj = Config.from_sources(None, env=config)
    assert config_obj.engine == "openai"
    assert config_obj.engine_url == f"http://voice-agent-model:{MODEL_PORT}/v1"
    # several replicas on one broker: each MQTT request goes to one of them
    assert config_obj.mqtt_share_group == "gateways" and config_obj.mqtt_client_id is None
    fields = {"VOICE_AGENT_" + name.upper() for name in Config.__dataclass_fields__}
    assert set(config) <= fields
    # the Secret is generated from secret.env, whose committed example holds no values
    (generator,) = load(K8S / "kustomization.yaml")["secretGenerator"]
    assert generator["name"] == secret_name and generator["envs"] == ["secret.env"]
    assert "secret.env" in (K8S / ".gitignore").read_text().split()
    example = (K8S / "secret.env.example").read_text().splitlines()
    assignments = [line for line in example if line and not line.startswith("#")]
    assert "VOICE_AGENT_TOKEN=" in assignments
    assert all(line.endswith("=") and line[:-1] in fields for line in assignments)


def test_k8s_model_worker_requests_a_gpu_and_serves_port_8000(
    k8s: dict[tuple[str, str], Any],
) -> None:
    model = k8s[("Deployment", "voice-agent-model")]
    container = one_container(model)
    assert container["image"].startswith("vllm/vllm-openai:")
    args = container["args"]
    assert args[args.index("--model") + 1] == MODEL_ID
    assert args[args.index("--port") + 1] == str(MODEL_PORT)
    assert [p["containerPort"] for p in container["ports"]] == [MODEL_PORT]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
        assert probe_port(container, probe) == MODEL_PORT
    resources = container["resources"]
    assert str(resources["requests"]["nvidia.com/gpu"]) == "1"
    assert str(resources["limits"]["nvidia.com/gpu"]) == "1"
    key = next(e for e in container["env"] if e["name"] == "VLLM_API_KEY")
    assert key["valueFrom"]["secretKeyRef"]["key"] == "VOICE_AGENT_ENGINE_API_KEY"


def test_k8s_services_route_to_the_right_pods_and_ports(
    k8s: dict[tuple[str, str], Any],
) -> None:
    gateway_svc = k8s[("Service", "voice-agent")]
    gateway = k8s[("Deployment", "voice-agent-gateway")]
    assert gateway_svc["spec"]["ports"][0]["port"] == GATEWAY_PORT
    assert service_target(gateway_svc, gateway) == GATEWAY_PORT
    assert selects(gateway_svc, gateway)
    assert gateway_svc["spec"]["sessionAffinity"] == "ClientIP"

    model_svc = k8s[("Service", "voice-agent-model")]
    model = k8s[("Deployment", "voice-agent-model")]
    assert model_svc["spec"]["ports"][0]["port"] == MODEL_PORT
    assert service_target(model_svc, model) == MODEL_PORT
    assert selects(model_svc, model) and not selects(model_svc, gateway)
    assert not selects(gateway_svc, model)


# -- Dockerfiles ----------------------------------------------------------------


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_entrypoint_port_user_volume_and_healthcheck(name: str) -> None:
    steps = instructions(DEPLOY / name)
    last = {word: rest for word, rest in steps}
    assert json.loads(last["ENTRYPOINT"]) == ["/usr/local/bin/entrypoint.sh"]
    assert "deploy/entrypoint.sh /usr/local/bin/entrypoint.sh" in [
        r for w, r in steps if w == "COPY"
    ]
    assert last["EXPOSE"] == str(GATEWAY_PORT)
    assert last["USER"].split(":")[0] not in ("root", "0")
    assert last["VOLUME"] == "/data"
    assert "/healthz" in last["HEALTHCHECK"]
    extras = next(r for w, r in steps if w == "ARG" and r.startswith("EXTRAS="))
    assert set(extras.split("=", 1)[1].split(",")) >= {"webrtc", "mqtt", "turn", "tts", "remote"}


def test_dockerfiles_bases_and_torch_builds() -> None:
    cpu = instructions(DEPLOY / "Dockerfile")
    gpu = instructions(DEPLOY / "Dockerfile.gpu")
    assert re.fullmatch(r"python:3\.1\d-slim.*", next(r for w, r in cpu if w == "FROM"))
    assert ("ARG", "TORCH_VERSION=2.13.0") in cpu and ("ARG", "TORCH_VERSION=2.13.0") in gpu
    assert ("ARG", "TORCH_INDEX=https://download.pytorch.org/whl/cpu") in cpu
    base = next(r for w, r in gpu if w == "ARG" and r.startswith("CUDA_IMAGE="))
    assert base.split("=", 1)[1].startswith("nvidia/cuda:") and "runtime" in base


# -- the entrypoint as a plain command -------------------------------------------


def entrypoint_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICE_AGENT_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["MODEL_MOUNT"] = "/nonexistent/model"
    env.update(extra)
    return env


def run_entrypoint(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env=entrypoint_env(**env),
        timeout=120,
    )


def test_entrypoint_flags_go_to_serve() -> None:
    done = run_entrypoint("--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: voice-agent serve") and "--engine-url" in done.stdout


def test_entrypoint_runs_voice_agent_subcommands() -> None:
    done = run_entrypoint("sessions", "--help")
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.startswith("usage: voice-agent sessions")
        and "{list,show,delete}" in done.stdout
    )
    top = run_entrypoint("help")
    assert top.returncode == 0 and "serve-model" in top.stdout
    unknown = run_entrypoint("no-such-subcommand")
    assert unknown.returncode == 2 and "invalid choice" in unknown.stderr


def test_entrypoint_runs_other_commands_as_given() -> None:
    done = run_entrypoint("sh", "-c", "echo plain $0", "command")
    assert (done.returncode, done.stdout) == (0, "plain command\n")


def test_entrypoint_uses_mounted_weights_only_when_present(tmp_path: Path) -> None:
    def model_env(**env: str) -> list[str]:
        done = run_entrypoint("env", **env)
        assert done.returncode == 0, done.stderr
        return [line for line in done.stdout.splitlines() if line.startswith("VOICE_AGENT_MODEL=")]

    (tmp_path / "config.json").write_text("{}")
    assert model_env(MODEL_MOUNT=str(tmp_path)) == [f"VOICE_AGENT_MODEL={tmp_path}"]
    assert model_env(MODEL_MOUNT=str(tmp_path / "absent")) == []
    assert model_env(MODEL_MOUNT=str(tmp_path), VOICE_AGENT_MODEL="/m") == ["VOICE_AGENT_MODEL=/m"]
    assert model_env(VOICE_AGENT_MODEL="") == []  # empty means unset: the server falls back


def get_json(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


@pytest.mark.timeout(300)
def test_entrypoint_serves_with_no_model_mounted(tiny_model_dir: Path, tmp_path: Path) -> None:
    """No weights mounted, none in the Hugging Face cache: `serve` falls back to the demo
    model (here the prebuilt tiny one), answers /healthz and the image's HEALTHCHECK, and
    stops on SIGTERM."""
    port = free_port()
    env = entrypoint_env(
        VOICE_AGENT_HOST="127.0.0.1",
        VOICE_AGENT_PORT=str(port),
        VOICE_AGENT_DEMO_MODEL_DIR=str(tiny_model_dir),
        VOICE_AGENT_DB=str(tmp_path / "conversations.db"),
        VOICE_AGENT_TTS="none",
        VOICE_AGENT_LOG_FORMAT="json",
        HF_HOME=str(tmp_path / "hf"),
        HF_HUB_OFFLINE="1",
    )
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen(["sh", str(ENTRYPOINT)], stdout=log, stderr=subprocess.STDOUT, env=env)

    def wait_for(path: str) -> dict[str, Any]:
        for _ in range(480):  # the tiny model loads: up to about 2 minutes
            assert proc.poll() is None, "the server exited early"
            try:
                status, body = get_json(f"http://127.0.0.1:{port}{path}")
            except OSError:
                status = 0
            if status == 200:
                return body
            time.sleep(0.25)
        pytest.fail(f"no 200 from {path}")

    try:
        assert wait_for("/healthz")["status"] == "ok"
        wait_for("/readyz")  # the model is loaded: the compose healthcheck passes
        health = wait_for("/healthz")
        assert health["demo_model"] is True, health

        # the image's own HEALTHCHECK command, run here against this server
        check = next(r for w, r in instructions(DEPLOY / "Dockerfile") if w == "HEALTHCHECK")
        command = json.loads(check[check.index("CMD") + 3 :])
        done = subprocess.run(
            [sys.executable, *command[1:]],
            env={**env, "VOICE_AGENT_PORT": str(port)},
            capture_output=True,
            timeout=30,
        )
        assert command[0] == "python" and done.returncode == 0, done.stderr

        proc.send_signal(signal.SIGTERM)  # exec'd: the server itself gets it
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
        log.close()
