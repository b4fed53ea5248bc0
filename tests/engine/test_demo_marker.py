"""A model written by make-tiny-model says so in its config.json, and every engine
that loads it, by whatever path, reports demo_model (issue 16, item 4)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from voice_agent.engine.loader import load_engine
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.tiny import DEMO_MODEL_KEY, is_demo_config


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
