"""Continuation over the OpenAI Realtime API, end to end: the official `openai`
SDK streams one sentence cut by a pause (server_vad, interrupt_response on,
the defaults) to a real server on loopback with the tiny Qwen2-Audio. The
first response is taken back (response.done cancelled if it was still open,
its user item and its reply deleted) and the whole sentence is answered as
one user item: one user turn in the model's history."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from tests.e2e.openai_support import RATE, append_audio, openai_server, realtime
from voice_agent.engine.qwen2_audio import Qwen2AudioEngine

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

CUT_MS = 940  # a quiet frame of ldc93s1, between "suit" and "in"


def cut_sentence_pcm24(path: str, pause_s: float) -> bytes:
    """ldc93s1 at 24 kHz PCM16 with a pause at CUT_MS (0.5 s before, 1.5 s after)."""
    data, rate = soundfile.read(path, dtype="float32")
    cut = CUT_MS * rate // 1000
    parts = [
        np.zeros(rate // 2),
        data[:cut],
        np.zeros(round(pause_s * rate)),
        data[cut:],
        np.zeros(rate * 3 // 2),
    ]
    audio = soxr.resample(np.concatenate(parts), rate, RATE)
    return bytes((np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes())


async def test_a_cut_sentence_is_one_user_item(
    tiny_engine: Qwen2AudioEngine, audio_dir: Path
) -> None:
    pcm = cut_sentence_pcm24(str(audio_dir / "ldc93s1-16k-mono.wav"), 0.9)
    async with openai_server(tiny_engine) as app, realtime(app) as (conn, log):
        await append_audio(conn.send, pcm)
        await log.wait("input_audio_buffer.speech_stopped", 2)
        first = (await log.wait("response.created"))["response"]["id"]
        final = await log.wait("response.done", where=lambda e: e["response"]["id"] != first)
        await log.wait("conversation.item.deleted", 2)
        [live] = app.sessions.values()
        history = tiny_engine.snapshot(live.conversation)
    users = [
        e["item"]["id"] for e in log.of("conversation.item.added") if e["item"]["role"] == "user"
    ]
    assert len(users) == 2  # one per utterance
    assert final["response"]["status"] in ("completed", "incomplete")  # (12 tokens at most)
    # The first response either was still open when the speech resumed
    # (cancelled) or had already ended on its own (12 tokens at most: how
    # fast depends on the machine); either way it is taken back below.
    ended = [
        e["response"]["status"] for e in log.of("response.done") if e["response"]["id"] == first
    ]
    assert ended in ([], ["cancelled"], ["completed"], ["incomplete"])
    deleted = [e["item_id"] for e in log.of("conversation.item.deleted")]
    assert deleted[0] == users[0] and len(deleted) == 2  # the first user item, then its reply
    assert users[1] not in deleted
    # the model's history: one user turn (the whole span) and its answer
    assert history is not None and len(history.clips) == 1
    assert [m["role"] for m in history.messages if m["role"] != "system"] == ["user", "assistant"]
    assert len(history.clips[0]) > 3 * 16000  # both parts and the pause
