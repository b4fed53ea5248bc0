"""The tiny model loads through the real from_pretrained path."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

from voice_agent.engine.tiny import SPECIAL_TOKENS, is_tiny_model


def test_tiny_model_loads_with_from_pretrained(tiny_model_dir: Path) -> None:
    assert is_tiny_model(tiny_model_dir)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(tiny_model_dir)
    processor = AutoProcessor.from_pretrained(tiny_model_dir)  # type: ignore[no-untyped-call]
    tok = processor.tokenizer
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert type(processor.feature_extractor).__name__ == "WhisperFeatureExtractor"
    assert processor.feature_extractor.feature_size == 128
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    assert len(set(ids.values())) == len(SPECIAL_TOKENS)
    assert all(i < 151000 for i in ids.values())  # its own vocabulary, not the real ids
    assert model.config.audio_token_id == ids["<|AUDIO|>"]
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|endoftext|>"
    assert set(model.generation_config.eos_token_id) == {ids["<|im_end|>"], ids["<|endoftext|>"]}
    assert 500 <= len(tok) <= 1100
    # Special tokens are single tokens inside text.
    enc = tok("<|im_start|>user\nhi<|AUDIO|><|AUDIO|><|im_end|>", add_special_tokens=False)
    assert enc["input_ids"][0] == ids["<|im_start|>"]
    assert enc["input_ids"].count(ids["<|AUDIO|>"]) == 2


def test_chat_template_ships_as_chat_template_json(tiny_model_dir: Path) -> None:
    data = json.loads((tiny_model_dir / "chat_template.json").read_text())
    assert "audio_count.value" in data["chat_template"]
    processor = AutoProcessor.from_pretrained(tiny_model_dir)  # type: ignore[no-untyped-call]
    assert processor.chat_template == data["chat_template"]
    text = processor.apply_chat_template(
        [
            {"role": "user", "content": [{"type": "audio", "audio": "a"}]},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "audio", "audio": "b"}]},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>" in text
    assert "Audio 2: <|audio_bos|><|AUDIO|><|audio_eos|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_weights_are_deterministic(tmp_path: Path, tiny_model_dir: Path) -> None:
    from voice_agent.engine.tiny import make_tiny_model

    other = make_tiny_model(tmp_path / "again")
    a = (tiny_model_dir / "model.safetensors").read_bytes()
    b = (other / "model.safetensors").read_bytes()
    assert a == b
    assert (tiny_model_dir / "tokenizer.json").read_bytes() == (
        other / "tokenizer.json"
    ).read_bytes()
