"""The one "Audio N" user-message builder (pure: no model, no event loop)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest

from voice_agent.engine import prompt


def test_audio_first_then_text_numbered_after_the_history() -> None:
    assert prompt.user_message(2, 2, "What is this?") == {
        "role": "user",
        "content": [
            {"type": "audio", "audio": "clip-3"},
            {"type": "audio", "audio": "clip-4"},
            {"type": "text", "text": "What is this?"},
        ],
    }


def test_voice_chat_turn_has_no_text_item_and_text_turn_no_audio() -> None:
    assert prompt.user_message(0, 1)["content"] == [{"type": "audio", "audio": "clip-1"}]
    assert prompt.user_message(0, 1, "")["content"] == [{"type": "audio", "audio": "clip-1"}]
    assert prompt.user_message(5, 0, "hi")["content"] == [{"type": "text", "text": "hi"}]


def test_items_in_the_given_order() -> None:
    message = prompt.user_content([prompt.text_item("first"), prompt.audio_item(1)])
    assert message["content"] == [
        {"type": "text", "text": "first"},
        {"type": "audio", "audio": "clip-1"},
    ]


@pytest.mark.parametrize(
    ("name", "number"),
    [
        ("clip-1", 1),
        ("clip-12", 12),
        ("clip-", 0),
        ("clip-x", 0),
        ("clip--1", 0),
        (None, 0),
        (3, 0),
    ],
)
def test_clip_number(name: object, number: int) -> None:
    assert prompt.clip_number(name) == number


def test_clip_number_reads_what_audio_item_writes() -> None:
    assert [prompt.clip_number(prompt.audio_item(n)["audio"]) for n in (1, 7, 30)] == [1, 7, 30]


def test_bad_counts_are_refused() -> None:
    with pytest.raises(ValueError):
        prompt.audio_item(0)
    with pytest.raises(ValueError):
        prompt.user_message(-1, 1)


def test_pure_module() -> None:
    tree = ast.parse(Path(prompt.__file__).read_text(encoding="utf-8"))
    imported = {
        (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not {m for m in imported if m.split(".")[0] in ("torch", "asyncio", "numpy")}


def test_renders_as_audio_n_lines_in_the_real_template(tiny_model_dir: Path) -> None:
    tf: Any = importlib.import_module("transformers")
    processor = tf.AutoProcessor.from_pretrained(str(tiny_model_dir), local_files_only=True)
    messages = [prompt.user_message(0, 1), {"role": "assistant", "content": "ok"}]
    messages.append(prompt.user_message(1, 2, "And these?"))
    text = processor.apply_chat_template(messages, tokenize=False)
    clip = "<|audio_bos|><|AUDIO|><|audio_eos|>\n"
    assert f"<|im_start|>user\nAudio 1: {clip}<|im_end|>" in text
    assert f"<|im_start|>user\nAudio 2: {clip}Audio 3: {clip}And these?<|im_end|>" in text
