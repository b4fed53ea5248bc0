"""A tiny random-weight Qwen2-Audio of the real classes, for tests and the demo.

`make_tiny_model(DIR)` writes, in a few seconds and without any network, a
directory that loads through exactly the same `from_pretrained` path as
Qwen/Qwen2-Audio-7B-Instruct: Qwen2AudioForConditionalGeneration weights
(config.json, model.safetensors, generation_config.json), a byte-level BPE
Qwen2Tokenizer trained here on a small built-in corpus, a 128-bin
WhisperFeatureExtractor and the Qwen2-Audio chat template in
chat_template.json. Its replies are noise, and its config.json says so
(`voice_agent_demo_model: true`): every engine that loads it reports
`demo_model`.

Special-token ids come from this tokenizer (they are small numbers, not the
real model's 151643...); code must read them from the tokenizer and config.
"""

from __future__ import annotations

import importlib
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("voice_agent.engine")

SEED = 1234
VOCAB_SIZE = 1000
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)
MARKER = ".voice-agent-tiny-model"
# Set to true in the config.json of every model make_tiny_model writes: an
# engine that loads such a model, by whatever path, reports demo_model (its
# replies are noise) and the page shows its banner.
DEMO_MODEL_KEY = "voice_agent_demo_model"

# A small English corpus, enough for ~1000 BPE tokens. Its words are what a
# voice assistant hears and says; the template's own words are in it too.
_CORPUS = """
You are a helpful assistant. Audio 1: Audio 2: Audio 3: system user assistant.
Hello! How can I help you today? Please turn on the kitchen light.
Turn off the living room lamp and close the bedroom curtains at nine o'clock.
What is the weather like tomorrow morning in Berlin, Paris, London or Tokyo?
Set a timer for ten minutes. Remind me to call my mother this evening.
The glass is breaking. Someone is speaking in Spanish. There is music playing.
And so my fellow Americans, ask not what your country can do for you, ask what
you can do for your country. Mister Quilter is the apostle of the middle
classes and we are glad to welcome his gospel. She had your dark suit in greasy
wash water all year. Don't ask me to carry an oily rag like that.
I heard a dog barking, a door slamming, footsteps, rain and thunder outside.
The speaker sounds happy, calm, angry, sad, surprised, tired or excited.
Transcribe the audio. Translate it into English. Summarize what was said.
What language is this? Who is speaking? How many people are talking?
Play some jazz in the study. Lower the volume. Skip this song, please.
Lock the front door, open the garage, and set the thermostat to twenty degrees.
Is the oven still on? Start the washing machine at noon. Water the garden.
Thank you very much. You're welcome. Good night, see you tomorrow.
One two three four five six seven eight nine ten eleven twelve hundred thousand.
Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March
April May June July August September October November December spring summer.
The quick brown fox jumps over the lazy dog while the birds sing in the trees.
Scientists discovered a new planet orbiting a distant star beyond our galaxy.
Cooking pasta requires boiling water, salt, olive oil, garlic and fresh basil.
Traffic on the highway was heavy because of an accident near the bridge.
Could you repeat that? I didn't catch the last part of your question.
The train to Munich departs from platform seven at a quarter past eight.
Children were laughing and playing football in the park after school.
Her favourite books are about history, philosophy, mathematics and poetry.
The doctor recommended drinking more water and walking every afternoon.
Electricity prices rose sharply during the winter, so we bought solar panels.
Please add milk, eggs, bread, butter, cheese, apples and coffee to my list.
"""


def _train_tokenizer() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = [line for line in _CORPUS.splitlines() if line.strip()]
    # Deterministic: the trainer is deterministic for a fixed input order.
    tok.train_from_iterator(lines * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return vocab, [(a, b) for a, b in merges]


def make_tiny_model(path: str | Path) -> Path:
    """Write the tiny random Qwen2-Audio to `path` (created if needed) and return it."""
    import torch
    from tokenizers import AddedToken

    # transformers ships partial type hints; treat it as untyped here.
    tf: Any = importlib.import_module("transformers")

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    logger.info("writing the tiny random Qwen2-Audio model to %s", out)

    vocab, merges = _train_tokenizer()
    tokenizer = tf.Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        audio_token="<|AUDIO|>",
        audio_bos_token="<|audio_bos|>",
        audio_eos_token="<|audio_eos|>",
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    ids = {t: int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS}

    feature_extractor = tf.WhisperFeatureExtractor(
        feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400
    )
    processor = tf.Qwen2AudioProcessor(feature_extractor=feature_extractor, tokenizer=tokenizer)
    template = str(processor.default_chat_template)
    processor.chat_template = template

    config = tf.Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": 1,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 64,
            "d_model": 32,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        audio_token_id=ids["<|AUDIO|>"],
    )
    config.audio_token_id = ids["<|AUDIO|>"]
    setattr(config, DEMO_MODEL_KEY, True)  # saved in config.json, read back by from_pretrained
    torch.manual_seed(SEED)
    model = tf.Qwen2AudioForConditionalGeneration(config)
    model.eval()
    model.generation_config = tf.GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        do_sample=False,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)

    # Ship the template as chat_template.json, like the real model directory.
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": template}, indent=2) + "\n", encoding="utf-8"
    )
    (out / MARKER).write_text("tiny random Qwen2-Audio: replies are noise\n", encoding="utf-8")
    logger.info("tiny model written (%d tokens in the vocabulary)", len(tokenizer))
    return out


def is_demo_config(config: Any) -> bool:
    """True for the config of a model written by make_tiny_model (random weights)."""
    return getattr(config, DEMO_MODEL_KEY, False) is True


def is_tiny_model(path: str | Path) -> bool:
    """True when `path` holds a complete tiny model written by make_tiny_model."""
    p = Path(path)
    return (p / MARKER).is_file() and (p / "config.json").is_file()
