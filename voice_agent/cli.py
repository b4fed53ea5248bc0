"""voice-agent serve | serve-model | ask | client | sessions | bench | make-tiny-model.

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
from voice_agent.engine.base import Engine
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
    engine: Engine
    if config.engine == "openai":
        from voice_agent.engine.loader import remote_engine

        engine = remote_engine(config)
    else:
        from functools import partial

        from voice_agent.engine.deferred import DeferredEngine
        from voice_agent.engine.qwen2_audio import DEFAULT_MODEL

        # Loaded once the port is open: /healthz answers, /readyz says 503 meanwhile.
        load = partial(
            load_engine,
            config.model,
            demo_dir=Path(config.demo_model_dir),
            **_engine_kwargs(config),
        )
        engine = DeferredEngine(load, config.model or DEFAULT_MODEL)
    run(config, engine)
    return 0


def cmd_serve_model(args: argparse.Namespace) -> int:
    from voice_agent.engine.loader import load_engine

    try:
        from voice_agent.model_server import serve_until_signal
    except ImportError as exc:
        raise VoiceAgentError(
            f"serve-model needs aiohttp ({exc.name}): pip install 'voice-agent[remote]'"
        ) from None
    config = Config.from_sources(args)
    setup_logging(config.log_level, config.log_format)
    kwargs = {**_engine_kwargs(config), "engine_process": False}  # needs the in-process engine
    engine = load_engine(config.model, demo_dir=Path(config.demo_model_dir), **kwargs)
    asyncio.run(
        serve_until_signal(
            engine,
            config.host,
            config.port,
            served_name=config.engine_model,
            api_key=config.engine_api_key,
            max_new_tokens=config.max_new_tokens,
        )
    )
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
        run_client(
            args.url,
            file=args.file,
            mic=args.mic,
            speed=args.speed,
            device=args.device,
            token=args.token or None,
            play=not args.no_play,
            save_reply=args.save_reply,
        )
    )


def cmd_sessions(args: argparse.Namespace) -> int:
    """List, show or delete stored conversations (store.py)."""
    import datetime
    import json

    from voice_agent.store import Store, render_messages, resolve_db

    config = Config.from_sources(args)
    path = resolve_db(config.db)
    if path is None:
        raise VoiceAgentError("--db none: there is no conversation store")
    if isinstance(path, Path) and not path.exists():
        raise VoiceAgentError(f"no conversation store at {path}")
    store = Store(path)  # a SQLite file, or a PostgreSQL URL

    def when(t: float) -> str:
        return datetime.datetime.fromtimestamp(t).isoformat(timespec="seconds")

    try:
        if args.action == "list":
            rows = store.list(args.limit)
            if args.json:
                print(json.dumps([row.__dict__ for row in rows]))
            for row in [] if args.json else rows:
                print(
                    f"{row.session_id}  {when(row.updated)}  {row.turns:4d} turns  "
                    f"{row.device or '-'}"
                )
            return 0
        if not args.session_id:
            raise VoiceAgentError(f"sessions {args.action} needs a SESSION_ID")
        if args.action == "show":
            record = store.load(args.session_id)
            if record is None:
                raise VoiceAgentError(f"no stored session {args.session_id}")
            h = record.history
            samples = [len(c) for c in h.clips]
            if args.json:
                print(
                    json.dumps(
                        {
                            "session_id": record.session_id,
                            "device": record.device,
                            "created": record.created,
                            "updated": record.updated,
                            "turns": h.turns,
                            "messages": h.messages,
                            "ids": h.ids,
                            "clip_samples": samples,
                        }
                    )
                )
                return 0
            print(f"session {record.session_id}  device {record.device or '-'}")
            print(f"created {when(record.created)}  updated {when(record.updated)}")
            print(f"{h.turns} turns, {len(h.ids)} tokens, {len(samples)} audio clips")
            for line in render_messages(h.messages, samples):
                print(line)
            return 0
        if not store.delete(args.session_id):
            raise VoiceAgentError(f"no stored session {args.session_id}")
        print(f"deleted {args.session_id}")
        return 0
    finally:
        store.close()


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
        help="run the server (page, /healthz, /readyz, /metrics, /v1/realtime)",
        description="Run the voice assistant server. Every flag also reads an env var.",
    )
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    serve_model = sub.add_parser(
        "serve-model",
        help="serve the model over the OpenAI chat-completions API (/v1/chat/completions)",
        description="Serve the local Qwen2-Audio engine at /v1/chat/completions (SSE streaming) "
        "and /v1/models, for gateways running --engine openai. Every flag also reads an env var.",
    )
    add_arguments(
        serve_model,
        only=[
            "host",
            "port",
            "model",
            "demo_model_dir",
            "device",
            "max_new_tokens",
            "temperature",
            "top_p",
            "max_queue",
            "max_batch",
            "kv_cache_budget",
            "engine_model",
            "engine_api_key",
            "log_level",
            "log_format",
        ],
    )
    serve_model.set_defaults(func=cmd_serve_model)

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
    client.add_argument(
        "--token",
        default=os.environ.get("VOICE_AGENT_TOKEN"),
        help="token sent in session.start when the server requires one (env VOICE_AGENT_TOKEN)",
    )
    client.add_argument(
        "--no-play",
        action="store_true",
        help="do not play the spoken replies (they play through sounddevice, the mic extra, "
        "when an audio output is there)",
    )
    client.add_argument(
        "--save-reply",
        metavar="DIR",
        default=None,
        help="save each spoken reply as DIR/<reply_id>.wav (cut-off ones as "
        "<reply_id>.cancelled.wav)",
    )
    client.set_defaults(func=cmd_client)

    sessions = sub.add_parser(
        "sessions",
        help="list, show or delete stored conversations",
        description="Stored conversations in the --db SQLite file (read while the server runs "
        "is fine; WAL mode).",
    )
    sessions.add_argument("action", choices=["list", "show", "delete"])
    sessions.add_argument("session_id", nargs="?", help="for show and delete")
    sessions.add_argument("--limit", type=int, default=100, help="list at most N (newest first)")
    sessions.add_argument("--json", action="store_true", help="print JSON")
    add_arguments(sessions, only=["db"])
    sessions.set_defaults(func=cmd_sessions)

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
