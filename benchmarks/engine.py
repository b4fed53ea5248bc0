"""Engine benchmark. Progress on stderr, one JSON object on stdout:

- TTFT by turn of one 10-turn conversation of 5 s utterances, with and
  without KV reuse (turns 1, 5 and 10 picked out, and every turn for plots);
- aggregate decode tokens/s with 1, 4 and 16 concurrent conversations
  (continuous batching: one batched model step for all decoding turns);
- KV cache memory per cached conversation;
- end-of-speech to first token with and without speculative prefill (the
  utterance prefilled during the VAD hangover);
- time to first token when 1, 4 and 16 voice turns arrive at the same moment.

`python benchmarks/plot.py RESULT.json` draws the charts.

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
from voice_agent.engine.kv import cache_bytes, new_cache
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine, _ConvState
from voice_agent.engine.tiny import make_tiny_model

AUDIO = Path(__file__).resolve().parents[1].parent / "shared" / "audio"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build_7b(tiny_dir: Path, layers: int = 32) -> tuple[Any, Any]:
    """Random weights in the 7B-Instruct shape, bf16 on CUDA, never saved or loaded.

    The processor (tokenizer, feature extractor, template) is the tiny model's:
    its ids are a subset of the big vocabulary, and audio_token_id follows it.
    `layers` below 32 (encoder and decoder alike) is for a smoke test of this
    path on a CPU; figures are only meaningful with all 32.
    """
    tf: Any = importlib.import_module("transformers")  # partially typed: treat as Any
    processor = tf.AutoProcessor.from_pretrained(tiny_dir)
    tok = processor.tokenizer
    config = tf.Qwen2AudioConfig(
        audio_config={
            "model_type": "qwen2_audio_encoder",
            "num_mel_bins": 128,
            "encoder_layers": layers,
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
            "num_hidden_layers": layers,
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
    if torch.cuda.is_available():
        where = "cuda"
    elif layers < 32:
        where = "cpu"  # smoke test of the 7B path, not a measurement
    else:
        raise SystemExit("--config 7b needs a CUDA GPU (or --layers N for a CPU smoke test)")
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(where):
            model = tf.Qwen2AudioForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.to(dtype=torch.bfloat16)
    model.eval()
    # Random weights pick ids all over the 156k vocabulary, and the tiny
    # tokenizer decodes almost none of them to text, so no reply delta (and no
    # time to first token) would ever be seen. Zero the output rows of ids the
    # tokenizer does not know, of its special tokens and of byte pieces that do
    # not decode to text alone: the random logits of its ordinary tokens then
    # always win under greedy decoding, every step shows as a text delta, and
    # replies run to max_new_tokens.
    specials = set(tok.all_special_ids) | {
        tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>", "<|AUDIO|>")
    }
    for i in range(len(tok)):
        piece = tok.decode([i], skip_special_tokens=True)
        if not piece.strip() or "\ufffd" in piece:
            specials.add(i)
    with torch.no_grad():
        weight = model.lm_head.weight
        weight[len(tok) :] = 0
        weight[sorted(i for i in specials if 0 <= i < weight.shape[0])] = 0
    return model, processor


def model_step_ms(model: Any, vocab: int, batch: int, context: int, steps: int) -> float:
    """Median time of one bare decode step of the model (transformers' forward
    plus lm_head and argmax, read back each step as the engine does), with a
    `context`-token cache per row: the floor under the engine's own step."""
    dev = next(model.parameters()).device
    cache = new_cache(model.config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, context), generator=gen).to(dev)
    times = []
    with torch.inference_mode():
        out = model.model(input_ids=ids, cache=cache, use_cache=True)
        nxt = model.lm_head(out.last_hidden_state[:, -1, :]).argmax(-1, keepdim=True)
        nxt.tolist()
        for _ in range(steps):
            t0 = time.perf_counter()
            out = model.model(input_ids=nxt, cache=cache, use_cache=True)
            nxt = model.lm_head(out.last_hidden_state[:, -1, :]).argmax(-1, keepdim=True)
            nxt.tolist()
            times.append(time.perf_counter() - t0)
    return round(float(np.median(times)) * 1000.0, 2)


async def run_turn(engine: Qwen2AudioEngine, conv: Any, turn: TurnInput, **kw: Any) -> Any:
    handle = engine.submit(conv, turn, **kw)
    async for _ in handle:
        pass
    return handle.result


async def one_turn(engine: Qwen2AudioEngine, audio: AudioArray) -> dict[str, float]:
    r = await run_turn(engine, engine.new_conversation(), TurnInput(audio=audio))
    decode_s = (r.timing.total_ms - r.timing.ttft_ms) / 1000.0
    n = r.usage.completion_tokens
    return {
        "ttft_ms": round(r.timing.ttft_ms, 2),
        "total_ms": round(r.timing.total_ms, 2),
        "completion_tokens": n,
        "prompt_tokens": r.usage.prompt_tokens,
        "tokens_per_s": round((n - 1) / decode_s, 1) if n > 1 and decode_s > 0 else 0.0,
    }


async def conversation(
    engine: Qwen2AudioEngine, audio: AudioArray, turns: int
) -> tuple[list[float], dict[str, int]]:
    conv = engine.new_conversation()
    ttfts = []
    memory: dict[str, int] = {}
    for i in range(turns):
        r = await run_turn(engine, conv, TurnInput(audio=audio))
        ttfts.append(r.timing.ttft_ms)
        log(f"  turn {i + 1}: ttft {ttfts[-1]:.1f} ms, prompt {r.usage.prompt_tokens}")
        st = conv.state
        assert isinstance(st, _ConvState)
        if i in (0, turns - 1):
            memory[f"after_turn_{i + 1}_bytes"] = cache_bytes(st.cache)
            memory[f"after_turn_{i + 1}_tokens"] = int(st.cache.get_seq_length()) if st.cache else 0
    return ttfts, memory


async def throughput(
    engine: Qwen2AudioEngine, audio: AudioArray, n: int, tokens: int
) -> dict[str, float]:
    """n conversations (each with one 5 s turn of history) decode a reply of up
    to `tokens` tokens at once; aggregate reply tokens per second."""
    convs = [engine.new_conversation() for _ in range(n)]
    for c in convs:
        await run_turn(engine, c, TurnInput(audio=audio), max_new_tokens=4)
    steps0 = engine.stats["batched_steps"]
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(
            run_turn(engine, c, TurnInput(text="Tell me more."), max_new_tokens=tokens)
            for c in convs
        )
    )
    seconds = time.perf_counter() - t0
    done = sum(r.usage.completion_tokens for r in results)
    return {
        "conversations": n,
        "tokens": done,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(done / seconds, 1),
        "decode_steps": engine.stats["batched_steps"] - steps0,
    }


async def burst(engine: Qwen2AudioEngine, audio: AudioArray, n: int) -> dict[str, float]:
    """n new conversations whose first 5 s voice turn arrives at the same
    moment: each one's time to first token. Turns that start in the same
    engine step are prefilled together in one forward (within the batched
    prefill's token bounds)."""
    convs = [engine.new_conversation() for _ in range(n)]
    results = await asyncio.gather(
        *(run_turn(engine, c, TurnInput(audio=audio), max_new_tokens=8) for c in convs)
    )
    ttfts = sorted(r.timing.ttft_ms for r in results)
    return {
        "conversations": n,
        "ttft_ms_first": round(ttfts[0], 2),
        "ttft_ms_p50": round(float(np.median(ttfts)), 2),
        "ttft_ms_last": round(ttfts[-1], 2),
    }


async def speculative(
    engine: Qwen2AudioEngine, audio: AudioArray, hangover_s: float, reps: int
) -> dict[str, float]:
    """End of speech (the VAD closes the utterance) to the first reply token,
    in a conversation with one turn of history, with and without a
    speculative prefill started `hangover_s` earlier (at the silence onset)."""
    out: dict[str, list[float]] = {"without": [], "with": []}
    for _ in range(reps):
        for mode in ("without", "with"):
            conv = engine.new_conversation()
            await run_turn(engine, conv, TurnInput(audio=audio), max_new_tokens=4)
            if mode == "with":
                engine.prefill_speculative(conv, audio)
            await asyncio.sleep(hangover_s)  # the hangover runs out
            r = await run_turn(engine, conv, TurnInput(audio=audio), max_new_tokens=4)
            out[mode].append(r.timing.ttft_ms)
    without, with_ = float(np.median(out["without"])), float(np.median(out["with"]))
    return {
        "hangover_ms": round(hangover_s * 1000),
        "repeats": reps,
        "without_ms": round(without, 2),
        "with_ms": round(with_, 2),
        "saved_ms": round(without - with_, 2),
        "speculative_hits": engine.stats["speculative_hits"],
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--model", help="model directory or hub id (default: the tiny model)")
    ap.add_argument("--config", choices=["tiny", "7b"], default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--turns", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--conversation-tokens", type=int, default=8)
    ap.add_argument("--throughput-tokens", type=int, default=128)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--hangover-ms", type=int, default=500)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--audio-dir", type=Path, default=AUDIO, help="folder with the test recordings")
    ap.add_argument(
        "--layers", type=int, default=32, help="--config 7b: layers (under 32: a smoke test only)"
    )
    args = ap.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    full = decode(args.audio_dir / "librispeech-1272-128104-0000.flac")
    audio = np.ascontiguousarray(full[: 5 * 16000])

    with tempfile.TemporaryDirectory() as tmp:
        tiny_dir = Path(tmp) / "tiny"

        def engine(kv_reuse: bool, max_new_tokens: int, **extra: Any) -> Qwen2AudioEngine:
            common: dict[str, Any] = {"kv_reuse": kv_reuse, "max_new_tokens": max_new_tokens}
            common.update(extra)
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
            model, processor = build_7b(tiny_dir, args.layers)
            log(f"built in {time.perf_counter() - t0:.1f} s")

        e = engine(True, args.max_new_tokens)
        await e.start()
        log("warm-up turn")
        await one_turn(e, audio)
        log("one 5 s voice-chat turn")
        single = await one_turn(e, audio)
        await e.close()

        curves: dict[str, list[float]] = {}
        memory: dict[str, int] = {}
        for reuse in (True, False):
            name = "kv_reuse" if reuse else "no_reuse"
            log(f"{args.turns}-turn conversation, {name}")
            e = engine(reuse, args.conversation_tokens)
            await e.start()
            await one_turn(e, audio)  # warm-up, in its own conversation
            curves[name], mem = await conversation(e, audio, args.turns)
            if reuse:
                memory = mem
            await e.close()

        by_n: dict[str, dict[str, float]] = {}
        levels = [int(x) for x in args.concurrency.split(",")]
        e = engine(True, args.throughput_tokens, max_batch=max(levels))
        await e.start()
        await throughput(e, audio, 2, 8)  # warm-up
        for n in levels:
            log(f"decode throughput, {n} concurrent conversation(s)")
            by_n[str(n)] = await throughput(e, audio, n, args.throughput_tokens)
            log(f"  {by_n[str(n)]['tokens_per_s']} tokens/s")
        log("bare model decode step (no engine), batch 1 and the largest level")
        bare = {
            str(n): model_step_ms(e.model, len(e.processor.tokenizer), n, 300, 20)
            for n in sorted({1, max(levels)})
        }
        for v in by_n.values():
            v["engine_step_ms"] = round(v["seconds"] * 1000.0 / max(1, v["decode_steps"]), 2)
        bursts: dict[str, dict[str, float]] = {}
        for n in levels:
            log(f"{n} voice turns arriving at once")
            bursts[str(n)] = await burst(e, audio, n)
            log(f"  last first token after {bursts[str(n)]['ttft_ms_last']} ms")
        await e.close()

        log("end of speech to first token, with and without speculative prefill")
        e = engine(True, 4)
        await e.start()
        await one_turn(e, audio)  # warm-up
        spec = await speculative(e, audio, args.hangover_ms / 1000, args.repeats)
        await e.close()

        def summary(ttfts: list[float]) -> dict[str, float]:
            picks = {
                f"turn{n}_ttft_ms": round(ttfts[n - 1], 2) for n in (1, 5, 10) if n <= len(ttfts)
            }
            picks[f"ratio_turn{len(ttfts)}_over_turn1"] = round(ttfts[-1] / ttfts[0], 2)
            return picks

        device = e.device
        one = by_n.get("1", {}).get("tokens_per_s", 0.0)
        result = {
            "benchmark": "engine",
            "model": (
                (f"random-7b-shape-{args.layers}-layers" if args.layers < 32 else "random-7b-shape")
                if args.config == "7b"
                else (args.model or "tiny")
            ),
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu": platform.processor() or platform.machine(),
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
                "ttft_ms_by_turn": {k: [round(x, 2) for x in v] for k, v in curves.items()},
            },
            "decode_throughput": {
                "max_new_tokens": args.throughput_tokens,
                "by_concurrency": by_n,
                "bare_model_step_ms_by_batch": bare,
                "speedup_over_one": {
                    k: round(v["tokens_per_s"] / one, 2) if one else None for k, v in by_n.items()
                },
            },
            "memory": {
                "kv_bytes_per_token": e._bytes_per_token,
                "cached_conversation": memory,
            },
            "speculative_prefill": spec,
            "simultaneous_turns": bursts,
        }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
