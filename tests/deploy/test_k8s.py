"""deploy/k8s/: the manifests kustomization lists, their probes, ports,
resources, config and secrets, and the services' routing."""

from __future__ import annotations

from typing import Any

import pytest
import yaml  # type: ignore[import-untyped,unused-ignore]

from .files import GATEWAY_PORT, K8S, MODEL_ID, MODEL_PORT, load


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
