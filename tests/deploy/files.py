"""What the deploy tests share: where deploy/ is, the ports and model it
promises, and readers for its YAML files and Dockerfiles."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml  # type: ignore[import-untyped,unused-ignore]

from tests.helpers.paths import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ENTRYPOINT = DEPLOY / "entrypoint.sh"
GATEWAY_PORT = 8765
MODEL_PORT = 8000
MODEL_ID = "Qwen/Qwen2-Audio-7B-Instruct"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


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
