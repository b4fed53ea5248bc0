"""The import graph: the core stays pure and the layers import one way.

The core (audio, vad, protocol, session, commands) imports no asyncio, not even
through a module it uses; the engine and the core never import the host or a
transport; the host never imports a transport (transports -> host -> session
-> engine). Imports are read from the source with ast, so a lazy import inside
a function counts as well.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "voice_agent"
CORE = [
    "voice_agent.session",
    "voice_agent.vad",
    "voice_agent.audio",
    "voice_agent.protocol",
    "voice_agent.commands",
]


def test_core_imports_no_asyncio() -> None:
    code = (
        "import json, sys\n"
        + "".join(f"import {m}\n" for m in CORE)
        + "print(json.dumps(['asyncio' in sys.modules,"
        " sorted(m for m in sys.modules if m.startswith('voice_agent'))]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    loaded, modules = json.loads(out.stdout)
    assert not loaded, f"the core pulls in asyncio through one of: {', '.join(modules)}"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = ROOT) -> set[str]:
    """Every voice_agent module `path` (under `root`) imports: absolute or
    relative, at module level or inside a function."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = _module_name(path, root).split(".")
    if path.name != "__init__.py":
        package.pop()
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return {m for m in found if m == "voice_agent" or m.startswith("voice_agent.")}


def _sources(*relative: str) -> list[Path]:
    out: list[Path] = []
    for rel in relative:
        p = PACKAGE / rel
        out += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    return [p for p in out if p.exists()]


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


LOWER = ["engine", "session", "vad", "audio.py", "protocol.py", "commands.py"]


@pytest.mark.parametrize(
    ("sources", "forbidden"),
    [
        (LOWER, ["voice_agent.host", "voice_agent.transports"]),
        (["host"], ["voice_agent.transports"]),
        (
            ["live.py", "live_setup.py"],
            ["voice_agent.host", "voice_agent.transports", "voice_agent.server"],
        ),
        (
            ["engine"],
            ["voice_agent.live", "voice_agent.session", "voice_agent.vad", "voice_agent.server"],
        ),
        (
            ["session", "vad", "audio.py", "protocol.py", "commands.py"],
            ["voice_agent.live", "voice_agent.server", "voice_agent.engine.base"],
        ),
    ],
    ids=["core-and-engine", "host", "live", "engine-below-sessions", "core-below-live"],
)
def test_imports_run_one_way(sources: list[str], forbidden: list[str]) -> None:
    files = _sources(*sources)
    assert files, "no sources found"
    wrong = [
        f"{p.relative_to(ROOT)} imports {m}"
        for p in files
        for m in sorted(imported_modules(p))
        if any(_within(m, f) for f in forbidden)
    ]
    assert not wrong, "imports against the layering:\n" + "\n".join(wrong)


def test_the_import_reader_sees_every_form(tmp_path: Path) -> None:
    """The reader itself can fail: absolute, from-, relative and lazy imports."""
    pkg = tmp_path / "voice_agent" / "host"
    pkg.mkdir(parents=True)
    src = pkg / "mod.py"
    src.write_text(
        "import voice_agent.transports.mqtt\n"
        "from voice_agent import transports\n"
        "from ..transports import websocket\n"
        "def f():\n"
        "    from .sibling import x\n"
    )
    found = imported_modules(src, tmp_path)
    assert "voice_agent.transports.mqtt" in found
    assert "voice_agent.transports" in found
    assert "voice_agent.transports.websocket" in found
    assert "voice_agent.host.sibling" in found
