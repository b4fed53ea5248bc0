"""The README's OpenAI Realtime examples (the openai SDK, Pipecat, LiveKit)
run as written against a real server on loopback (only the port and the key
changed): the client docs cannot rot."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import pytest

from tests.e2e.openai_support import KEY, openai_server
from tests.helpers.paths import ROOT
from tests.helpers.servers import project_env
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def readme_examples() -> list[str]:
    """The ```python blocks of README.md's "The OpenAI Realtime API" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### The OpenAI Realtime API", 1)[1].split("\n### ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_section_has_the_three_clients() -> None:
    blocks = readme_examples()
    assert len(blocks) == 3
    clients = ("AsyncOpenAI", "OpenAIRealtimeLLMService", "RealtimeModel")
    for block, client in zip(blocks, clients, strict=True):
        assert client in block


@pytest.mark.parametrize("index", [0, 1, 2], ids=["openai-sdk", "pipecat", "livekit"])
async def test_the_readme_example_runs(
    tiny_engine: Qwen2AudioEngine, index: int, tmp_path: Path
) -> None:
    async with openai_server(tiny_engine) as app:
        code = readme_examples()[index].replace(":8765/", f":{app.port}/")
        code = code.replace('"TOKEN"', repr(KEY))
        script = tmp_path / "example.py"
        script.write_text(code, encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            str(script),
            env=project_env(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    problems = [
        line
        for line in err.decode(errors="replace").splitlines()
        if "| ERROR" in line or "returned an error" in line or "Traceback" in line
    ]
    assert not problems, problems
    if index == 0:
        assert out.decode().rstrip().endswith(("[completed]", "[incomplete]")), out
