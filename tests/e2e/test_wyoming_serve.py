"""`voice-agent serve --wyoming tcp://127.0.0.1:PORT` itself (the command
line, its defaults, the tiny random Qwen2-Audio from a directory, the
default voice) answers Home Assistant's describe, transcribe, handle and
synthesize sequences on loopback (tests/e2e/wyoming_support.py), and stops
cleanly on SIGTERM."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from tests.e2e.wyoming_support import (
    MAX_TOKENS,
    Server,
    audio_of,
    describe,
    handle,
    handled_text,
    recording,
    synthesize,
    transcribe,
    transcript_of,
)
from tests.helpers.ports import free_port, wait_listening
from tests.helpers.processes import cli_process, stop_process, until_http_ok
from tests.helpers.speech import voiced_fraction

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


async def test_voice_agent_serve_answers_home_assistant(
    tiny_model_dir: Path, audio_dir: Path, tmp_path: Path
) -> None:
    port, wyoming = free_port(), free_port()
    args = ["serve", "--model", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--db", "none", "--max-new-tokens", str(MAX_TOKENS)]
    args += ["--wyoming", f"tcp://127.0.0.1:{wyoming}"]
    pcm = recording(audio_dir / "ldc93s1-16k-mono.wav")
    # the helpers need only the Wyoming port (no Services of a child process)
    server = Server(services=cast(Any, None), port=wyoming)
    with (tmp_path / "serve.log").open("w") as out:
        proc = cli_process(*args, log=out)
        try:
            async with aiohttp.ClientSession() as http:
                await until_http_ok(http, f"http://127.0.0.1:{port}/readyz", proc)
            # The Wyoming port may open a moment after /readyz says ready (it is
            # started after the engine); Home Assistant retries a refused connect
            # too (data.py: 3 tries, 2 s apart).
            assert wait_listening(wyoming, 30, alive=lambda: proc.poll() is None)
            info = await describe(server)
            transcript = await transcribe(server, pcm)
            handled = await handle(server, "Hello there.", "01J000SERVE")
            spoken = await synthesize(server, "The kitchen light is off now.")
        finally:
            code = stop_process(proc)
    log = (tmp_path / "serve.log").read_text()
    assert code == 0, log[-2000:]
    assert info.asr and info.handle and info.tts, info
    transcript_of(transcript)
    handled_text(handled)
    pcm_out = audio_of(spoken)
    assert voiced_fraction(pcm_out.audio, pcm_out.rate) > 0.4
