"""Engine benchmark: TTFT and decode speed, and TTFT over a 10-turn conversation
with and without KV reuse. Progress on stderr, one JSON object on stdout.

    python benchmarks/engine.py                 # tiny random model, CPU (seconds)
    python benchmarks/engine.py --model DIR     # real weights
    python benchmarks/engine.py --config 7b     # random 7B-Instruct shapes, bf16, CUDA

The tiny model's numbers show the engine's overheads and the shape of the
reuse curve, not real-model speed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from voice_agent.audio import decode
from voice_agent.engine.base import AudioArray, TurnInput
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine
from voice_agent.engine.tiny import make_tiny_model

AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_7b(tiny_dir: Path) -> tuple[Any, Any]:
    """Random weights in the 7B-Instruct shape, bf16 on CUDA, never saved or loaded.

    The processor (tokenizer, feature extractor, template) is the tiny model's:
    its ids are a subset of the big vocabulary, and audio_token_id follows it.
    """
    tf: Any = importlib.import_module("transformers")  # partially typed: treat as Any
    processor = tf.AutoProcessor.from_pretrained(tiny_dir)
    tok = processor.tokenizer
    config = tf.Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": 32,
            "encoder_attention_heads": 20,
            "encoder_ffn_dim": 5120,
            "d_model": 1280,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2",
            "vocab_size": 156032,
            "hidden_size": 4096,
            "intermediate_size": 11008,
            "num_hidden_layers": 32,
            "num_attention_heads": 32,
            "num_key_value_heads": 32,
            "max_position_embeddings": 8192,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "eos_token_id": tok.convert_tokens_to_ids("<|im_end|>"),
            "pad_token_id": tok.convert_tokens_to_ids("<|endoftext|>"),
        },
        audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"),
    )
    if not torch.cuda.is_available():
        raise SystemExit("--config 7b needs a CUDA GPU")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = tf.Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype=torch.bfloat16)
    model.eval()
    return model, processor


async def one_turn(engine: Qwen2AudioEngine, audio: AudioArray) -> dict[str, float]:
    conv = engine.new_conversation()
    handle = engine.submit(conv, TurnInput(audio=audio))
    async for _ in handle:
        pass
    r = handle.result
    decode_s = (r.timing.total_ms - r.timing.ttft_ms) / 1000.0
    n = r.usage.completion_tokens
    return {
        "ttft_ms": round(r.timing.ttft_ms, 2),
        "total_ms": round(r.timing.total_ms, 2),
        "completion_tokens": n,
        "prompt_tokens": r.usage.prompt_tokens,
        "tokens_per_s": round((n - 1) / decode_s, 1) if n > 1 and decode_s > 0 else 0.0,
    }


async def conversation(engine: Qwen2AudioEngine, audio: AudioArray, turns: int) -> list[float]:
    conv = engine.new_conversation()
    ttfts = []
    for i in range(turns):
        handle = engine.submit(conv, TurnInput(audio=audio))
        async for _ in handle:
            pass
        ttfts.append(handle.result.timing.ttft_ms)
        log(f"  turn {i + 1}: ttft {ttfts[-1]:.1f} ms, prompt {handle.result.usage.prompt_tokens}")
    return ttfts


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", help="model directory or hub id (default: the tiny model)")
    ap.add_argument("--config", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--conversation-tokens", type=int, default=8)
    args = ap.parse_args()

    full = decode(AUDIO / "librispeech-1272-128104-0000.flac")
    audio = np.ascontiguousarray(full[: 5 * 16000])

    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = Path(tmp) / "tiny"

        def engine(kv_reuse: bool, max_new_tokens: int) -> Qwen2AudioEngine:
            common: dict[str, Any] = {"kv_reuse": kv_reuse, "max_new_tokens": max_new_tokens}
            if args.config == "7b":
                return Qwen2AudioEngine.from_loaded(model, processor, **common)
            e = Qwen2AudioEngine(args.model or str(tiny_dir), device=args.device, **common)
            e.load()
            return e

        model: Any = None
        processor: Any = None
        if args.config == "7b" or not args.model:
            log("making the tiny model")
            make_tiny_model(tiny_dir)
        if args.config == "7b":
            log("building random 7B-Instruct-shaped weights on CUDA (bf16)")
            t0 = time.perf_counter()
            model, processor = build_7b(tiny_dir)
            log(f"built in {time.perf_counter() - t0:.1f} s")

        e = engine(True, args.max_new_tokens)
        await e.start()
        log("warm-up turn")
        await one_turn(e, audio)
        log("one 5 s voice-chat turn")
        single = await one_turn(e, audio)
        await e.close()

        curves: dict[str, list[float]] = {}
        for reuse in (True, False):
            name = "kv_reuse" if reuse else "no_reuse"
            log(f"{args.turns}-turn conversation, {name}")
            e = engine(reuse, args.conversation_tokens)
            await e.start()
            await one_turn(e, audio)  # warm-up, in its own conversation
            curves[name] = await conversation(e, audio, args.turns)
            await e.close()

        def summary(ttfts: list[float]) -> dict[str, float]:
            picks = {
                f"turn{n}_ttft_ms": round(ttfts[n - 1], 2) for n in (1, 5, 10) if n <= len(ttfts)
            }
            picks[f"ratio_turn{len(ttfts)}_over_turn1"] = round(ttfts[-1] / ttfts[0], 2)
            return picks

        device = e.device
        result = {
            "benchmark": "engine",
            "model": "random-7b-shape" if args.config == "7b" else (args.model or "tiny"),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "dtype": str(e.dtype).removeprefix("torch."),
            "cpu_threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "torch": torch.__version__,
            "audio_seconds": len(audio) / 16000,
            "voice_chat_turn": single,
            "conversation": {
                "turns": args.turns,
                "kv_reuse": summary(curves["kv_reuse"]),
                "no_reuse": summary(curves["no_reuse"]),
            },
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
