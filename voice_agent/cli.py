"""voice-agent serve | ask | client | bench | make-tiny-model.

Errors the user can fix end the program with one line on stderr and a
non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from voice_agent.config import Config, add_arguments
from voice_agent.errors import VoiceAgentError
from voice_agent.logs import setup_logging

EXIT_USAGE = 2


def _engine_kwargs(config: Config) -> dict[str, object]:
    from voice_agent.engine.loader import engine_options

    return {
        "device": config.device,
        "max_new_tokens": config.max_new_tokens,
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_queue": config.max_queue,
        **engine_options(config),
    }


def cmd_serve(args: argparse.Namespace) -> int:
    from voice_agent.engine.loader import load_engine
    from voice_agent.server import run

    config = Config.from_sources(args)
    setup_logging(config.log_level, config.log_format)
    engine = load_engine(
        config.model, demo_dir=Path(config.demo_model_dir), **_engine_kwargs(config)
    )
    run(config, engine)
    return 0


async def _ask(args: argparse.Namespace, config: Config) -> int:
    from voice_agent.audio import decode
    from voice_agent.engine.base import TurnInput
    from voice_agent.engine.loader import load_engine

    audio = decode(args.file)  # fails early, before the slow model load
    engine = await asyncio.to_thread(
        load_engine, config.model, demo_dir=Path(config.demo_model_dir), **_engine_kwargs(config)
    )
    if engine.demo_model:
        print("[demo model: the reply is random noise]", file=sys.stderr)
    await engine.start()
    try:
        conversation = engine.new_conversation(config.system_prompt)
        handle = engine.submit(conversation, TurnInput(audio=audio, text=args.prompt))
        async for delta in handle:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        usage = handle.result.usage
        timing = handle.result.timing
        print(
            f"[{usage.prompt_tokens} prompt tokens, {usage.completion_tokens} reply tokens, "
            f"ttft {timing.ttft_ms:.0f} ms, total {timing.total_ms:.0f} ms]",
            file=sys.stderr,
        )
    finally:
        await engine.close()
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    config = Config.from_sources(args)
    setup_logging("warning" if config.log_level == "info" else config.log_level, "text")
    return asyncio.run(_ask(args, config))


def cmd_client(args: argparse.Namespace) -> int:
    from voice_agent.client import run_client

    if not args.file and not args.mic:
        raise VoiceAgentError("give an audio FILE or --mic")
    setup_logging("warning", "text")
    return asyncio.run(
        run_client(args.url, file=args.file, mic=args.mic, speed=args.speed, device=args.device)
    )


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from voice_agent.engine.tiny import make_tiny_model

    path = make_tiny_model(Path(args.dir))
    print(f"tiny random Qwen2-Audio written to {path} (its replies are noise)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{args.name}.py"
    if not script.is_file():
        raise VoiceAgentError(f"benchmark not found: {script} (run from a source checkout)")
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="voice-agent", description="Self-hosted real-time voice assistant (Qwen2-Audio)."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the server (page, /healthz, /v1/realtime)",
        description="Run the voice assistant server. Every flag also reads an env var.",
    )
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    ask = sub.add_parser("ask", help="one turn on an audio file, reply streamed to stdout")
    ask.add_argument("file", help="WAV/FLAC/OGG/MP3 file")
    ask.add_argument(
        "--prompt", default=None, help="instruction about the audio (audio analysis mode)"
    )
    add_arguments(
        ask,
        only=[
            "model",
            "demo_model_dir",
            "device",
            "max_new_tokens",
            "temperature",
            "top_p",
            "system_prompt",
            "log_level",
        ],
    )
    ask.set_defaults(func=cmd_ask)

    client = sub.add_parser("client", help="reference smart-speaker client")
    client.add_argument("file", nargs="?", help="audio file to stream at real-time pace")
    client.add_argument("--mic", action="store_true", help="stream the default microphone")
    client.add_argument(
        "--url",
        default=os.environ.get("VOICE_AGENT_URL", "ws://127.0.0.1:8765/v1/realtime"),
        help="server endpoint (env VOICE_AGENT_URL)",
    )
    client.add_argument(
        "--speed", type=float, default=1.0, help="send N times faster than real time (0: at once)"
    )
    client.add_argument("--device", default=None, help="device name sent in session.start")
    client.set_defaults(func=cmd_client)

    tiny = sub.add_parser("make-tiny-model", help="write the tiny random test model to DIR")
    tiny.add_argument("dir")
    tiny.set_defaults(func=cmd_make_tiny_model)

    bench = sub.add_parser("bench", help="run a benchmark from benchmarks/ (prints JSON)")
    bench.add_argument("name", nargs="?", default="engine", help="engine or ingest")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.func(args)
    except VoiceAgentError as exc:
        print(f"voice-agent: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
