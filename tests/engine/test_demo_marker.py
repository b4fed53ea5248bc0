"""A model written by make-tiny-model says so in its config.json, and every engine
that loads it, by whatever path, reports demo_model (issue 16, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from voice_agent.engine.base import Engine
from voice_agent.engine.loader import load_engine
from voice_agent.engine.openai import OpenAIEngine
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.engine.tiny import DEMO_MODEL_KEY, is_demo_config
from voice_agent.model_server import serving


def test_the_mark_is_in_config_json(tiny_model_dir: Path) -> None:
    config = json.loads((tiny_model_dir / "config.json").read_text(encoding="utf-8"))
    assert config[DEMO_MODEL_KEY] is True


def test_explicit_path_to_a_tiny_model_is_a_demo_model(tiny_model_dir: Path) -> None:
    """`--model DIR` (not the automatic fallback): the real from_pretrained path."""
    engine = Qwen2AudioEngine(str(tiny_model_dir), local_files_only=True)
    assert engine.demo_model is False  # nothing known before loading
    engine.load()
    assert engine.demo_model is True
    assert is_demo_config(engine.model.config)


def test_load_engine_with_model_given_reports_demo(tiny_model_dir: Path, tmp_path: Path) -> None:
    engine = load_engine(str(tiny_model_dir), demo_dir=tmp_path / "unused", max_new_tokens=4)
    assert engine.demo_model is True
    assert not (tmp_path / "unused").exists()  # the fallback did not run


def test_a_config_without_the_mark_is_not_a_demo_model(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    plain = tmp_path / "plain"
    shutil.copytree(tiny_model_dir, plain)
    path = plain / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    del config[DEMO_MODEL_KEY]
    path.write_text(json.dumps(config), encoding="utf-8")
    engine = Qwen2AudioEngine(str(plain), local_files_only=True)
    engine.load()
    assert engine.demo_model is False
    assert not is_demo_config(engine.model.config)


def test_a_false_or_odd_mark_is_not_a_demo_model() -> None:
    class Config:
        pass

    config = Config()
    assert not is_demo_config(config)
    for value in (False, "true", 1, None):
        setattr(config, DEMO_MODEL_KEY, value)
        assert not is_demo_config(config)


async def remote_demo_flag(backend: Engine, name: str | None) -> tuple[bool, bool]:
    """(demo_model after start, after a ready() probe) of an OpenAIEngine (the
    gateway's `--engine openai`) in front of serve-model serving `backend`."""
    try:
        async with serving(backend) as (server, port):
            remote = OpenAIEngine(f"http://127.0.0.1:{port}/v1", name and server.served_name)
            try:
                await remote.start()
                started = remote.demo_model
                assert await remote.ready()
                return started, remote.demo_model
            finally:
                await remote.close()
    finally:
        await backend.close()


@pytest.mark.parametrize("named", [True, False])
async def test_a_remote_engine_in_front_of_a_tiny_model_is_a_demo_model(
    tiny_model_dir: Path, named: bool
) -> None:
    """serve-model's /v1/models entry carries the mark; the gateway reads it at
    start, so its first session.started already says demo_model."""
    backend = Qwen2AudioEngine(str(tiny_model_dir), max_new_tokens=4)
    assert await remote_demo_flag(backend, "named" if named else None) == (True, True)


async def test_a_remote_engine_in_front_of_another_model_is_not() -> None:
    assert await remote_demo_flag(ScriptedEngine(["hi"]), None) == (False, False)
