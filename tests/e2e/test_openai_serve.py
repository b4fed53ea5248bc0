"""A spoken conversation between the official `openai` SDK and `voice-agent
serve` itself (what `make run` starts: the command line, its defaults, the
tiny random Qwen2-Audio from a directory, Piper speaking): two turns by voice,
the server's VAD taking the turns, each answered in audio, the second one on
the first one's KV cache."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from tests.e2e.openai_support import (
    KEY,
    MAX_TOKENS,
    MODEL,
    EventLog,
    append_audio,
    check_response,
    finished,
    pcm24,
    pcm_of,
    update_session,
)
from tests.helpers.ports import free_port
from tests.helpers.processes import cli_process, stop_process, until_http_ok

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


async def test_a_spoken_conversation_with_voice_agent_serve(
    tiny_model_dir: Path, audio_dir: Path, tmp_path: Path
) -> None:
    from openai import AsyncOpenAI

    port = free_port()
    args = ["serve", "--model", str(tiny_model_dir), "--host", "127.0.0.1", "--port", str(port)]
    args += ["--token", KEY, "--db", "none", "--max-new-tokens", str(MAX_TOKENS)]
    clips = [
        pcm24(audio_dir / "ldc93s1-16k-mono.wav"),
        # The user waits past the default continue window (3 s of microphone
        # audio after the first turn closed): a new turn, not a continuation.
        pcm24(audio_dir / "new-home-in-the-stars-16k.wav", before=2.5),
    ]
    with (tmp_path / "serve.log").open("w") as out:
        proc = cli_process(*args, log=out)
        try:
            async with aiohttp.ClientSession() as http:
                await until_http_ok(http, f"http://127.0.0.1:{port}/readyz", proc)
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY)
            async with (
                client.realtime.connect(model=MODEL) as conn,
                EventLog(conn.recv_bytes) as log,
            ):
                await log.wait("session.created")
                vad = {"type": "server_vad", "silence_duration_ms": 600}
                await update_session(
                    conn,
                    log,
                    output_modalities=["audio"],
                    audio={"input": {"turn_detection": vad}},
                )
                for n, pcm in enumerate(clips, 1):
                    await append_audio(conn.send, pcm)
                    await log.wait("response.done", n)
        finally:
            code = stop_process(proc)
    assert code == 0, (tmp_path / "serve.log").read_text()[-2000:]
    committed = log.of("input_audio_buffer.committed")
    assert len(committed) == 2, log.types()
    first, second = log.of("response.done")
    replies = []
    for done in (first, second):
        assert finished(done), done["response"]
        replies.append(check_response(log, done, modality="audio"))
        pcm = pcm_of(log.of("response.output_audio.delta", response_id=done["response"]["id"]))
        assert len(pcm) % 2 == 0
    # the second spoken turn follows the first reply in the conversation ...
    (user2,) = [
        e for e in log.of("conversation.item.added") if e["item"]["id"] == committed[1]["item_id"]
    ]
    assert user2["previous_item_id"] == replies[0]["id"]
    # ... and is answered on the KV cache the first turn left
    assert second["response"]["usage"]["input_token_details"]["cached_tokens"] > 0
