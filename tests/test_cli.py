"""The voice-agent command line, run as a real subprocess where it matters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voice_agent.cli import build_parser, main

pytestmark = pytest.mark.timeout(180)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "voice_agent.cli", *args],
        capture_output=True,
        text=True,
        timeout=170,
        env=env,
    )


def test_ask_streams_a_reply_from_the_tiny_model(tiny_model_dir: Path, audio_dir: Path) -> None:
    result = run_cli(
        "ask", str(audio_dir / "jfk.wav"), "--model", str(tiny_model_dir), "--max-new-tokens", "8"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the (noise) reply text
    assert "8 reply tokens" in result.stderr


def test_ask_audio_analysis_mode(tiny_model_dir: Path, audio_dir: Path) -> None:
    result = run_cli(
        "ask",
        str(audio_dir / "glass-breaking.mp3"),
        "--prompt",
        "What is this sound?",
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "4",
    )
    assert result.returncode == 0, result.stderr
    assert "4 reply tokens" in result.stderr


def test_ask_with_a_missing_model_is_one_clear_line(audio_dir: Path) -> None:
    result = run_cli("ask", str(audio_dir / "jfk.wav"), "--model", "/nonexistent")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "cannot load model '/nonexistent'" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "no such file"),
        (b"this is not audio at all" * 20, "cannot decode audio"),
        (b"", "cannot decode audio"),
        ("dir", "not a file"),
        ("empty-wav", "audio is empty"),
    ],
)
def test_ask_with_bad_audio_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | str | None, expected: str
) -> None:
    path = tmp_path / "x.wav"
    if content == "dir":
        path.mkdir()
    elif content == "empty-wav":
        sf.write(path, np.zeros(0, dtype=np.int16), 16000)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    # the audio is checked before the (slow) model load
    assert main(["ask", str(path), "--model", "/nonexistent"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("voice-agent: error: ")
    assert expected in err[0]


def test_make_tiny_model_writes_a_loadable_directory(tmp_path: Path) -> None:
    assert main(["make-tiny-model", str(tmp_path / "tiny")]) == 0
    names = {p.name for p in (tmp_path / "tiny").iterdir()}
    assert {"config.json", "model.safetensors", "chat_template.json"} <= names


def test_serve_help_explains_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag, env in [
        ("--port", "VOICE_AGENT_PORT"),
        ("--model", "VOICE_AGENT_MODEL"),
        ("--hangover-ms", "VOICE_AGENT_HANGOVER_MS"),
        ("--max-message-bytes", "VOICE_AGENT_MAX_MESSAGE_BYTES"),
    ]:
        assert flag in out and env in out


def test_client_without_file_or_mic_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["client"]) == 2
    assert "give an audio FILE or --mic" in capsys.readouterr().err


def test_client_reply_audio_flags() -> None:
    args = build_parser().parse_args(["client", "in.wav", "--save-reply", "out"])
    assert (args.save_reply, args.no_play) == ("out", False)  # plays by default
    args = build_parser().parse_args(["client", "--mic", "--no-play"])
    assert (args.save_reply, args.no_play) == (None, True)


def test_engine_flags_reach_the_engine_loader() -> None:
    from voice_agent.config import Config
    from voice_agent.engine.loader import engine_options

    flags = ["--max-batch", "3", "--kv-cache-budget", str(1 << 20), "--engine-process"]
    args = build_parser().parse_args(["serve", *flags])
    options = engine_options(Config.from_sources(args, env={}))
    assert (options["max_batch"], options["kv_cache_budget"], options["engine_process"]) == (
        3,
        1 << 20,
        True,
    )
