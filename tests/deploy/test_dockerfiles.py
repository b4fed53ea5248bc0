"""deploy/Dockerfile and Dockerfile.gpu: entrypoint, port, user, volume,
healthcheck, bases and torch builds."""

from __future__ import annotations

import json
import re

import pytest

from .files import DEPLOY, GATEWAY_PORT, instructions


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
