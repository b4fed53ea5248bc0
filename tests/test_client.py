"""voice_agent/client/'s spoken-reply side: --save-reply against a real server with
espeak-ng on loopback, and playback that never crashes without a device."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import types
import wave
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
import webrtcvad

from voice_agent.audio import float_to_pcm16, resample
from voice_agent.client import AudioPlayer, RealtimeClient, ReplyAudio, run_client
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.protocol import (
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
)
from voice_agent.transports.websocket import running_server
from voice_agent.tts.espeak import EspeakTTS
from voice_agent.tts.speaker import Speech


def voiced_fraction(audio: np.ndarray, rate: int) -> float:
    """Share of 30 ms frames webrtcvad (aggressiveness 3) calls speech, at 16 kHz."""
    pcm = float_to_pcm16(resample(audio.astype(np.float32) / 32768, rate, 16000))
    vad = webrtcvad.Vad(3)
    step = 960
    frames = [pcm[i : i + step] for i in range(0, len(pcm) - step + 1, step)]
    return sum(vad.is_speech(f, 16000) for f in frames) / max(1, len(frames))


pytestmark = pytest.mark.timeout(90)

REPLY = "Sure, the kitchen light is on now. Anything else?"
LONG = " ".join(f"This is sentence number {n} of a very long answer." for n in range(40))


@pytest.fixture
def config() -> Config:
    return Config(host="127.0.0.1", port=0, ping_interval=5.0, db="none")


@pytest.fixture
async def speech() -> AsyncIterator[Speech]:
    s = Speech(EspeakTTS())
    yield s
    s.close()


async def test_save_reply_writes_a_wav_with_speech(
    config: Config, speech: Speech, audio_dir: Path, tmp_path: Path
) -> None:
    engine = ScriptedEngine([REPLY], token_delay=0.005)
    out = io.StringIO()
    save = tmp_path / "replies"
    async with running_server(config, engine, speech=speech) as app:
        code = await run_client(
            app.url,
            str(audio_dir / "ldc93s1-16k-mono.wav"),
            speed=0,
            out=out,
            save_reply=save,
            output_sample_rate=22050,
        )
    assert code == 0, out.getvalue()
    lines = out.getvalue().splitlines()
    assert "reply.audio.started r1 (22050 Hz)" in lines
    done = next(line for line in lines if line.startswith("reply.audio.done r1 "))
    assert sorted(p.name for p in save.iterdir()) == ["r1.wav"]
    audio, rate = soundfile.read(str(save / "r1.wav"), dtype="int16")
    assert rate == 22050  # the rate reply.audio.started announced
    assert audio.ndim == 1
    duration_ms = len(audio) * 1000 // rate
    assert f"({duration_ms} ms)" in done  # all that was sent, nothing else
    assert duration_ms > 1500  # two sentences
    assert voiced_fraction(audio, rate) > 0.4


async def test_a_cut_off_reply_is_saved_as_cancelled(
    config: Config, speech: Speech, tmp_path: Path
) -> None:
    engine = ScriptedEngine([LONG], token_delay=0.01)
    spoken = ReplyAudio(tmp_path)
    async with (
        running_server(config, engine, speech=speech) as app,
        RealtimeClient(app.url, on_event=spoken.event, on_audio=spoken.frame) as c,
    ):
        await c.start()
        await c.send_text("talk")
        await c.wait_for(ReplyAudioStarted)
        for _ in range(1000):  # bounded: until half a second of audio arrived
            if c.audio_bytes >= 16000:
                break
            await asyncio.sleep(0.02)
        await c.cancel()
        done = await c.wait_for(ReplyAudioDone)
    spoken.close()
    assert done.cancelled
    assert [p.name for p in spoken.saved] == ["r1.cancelled.wav"]
    with wave.open(str(spoken.saved[0])) as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1
        assert w.getnframes() * 1000 // 16000 == done.duration_ms  # every frame sent


def test_reply_audio_saves_in_order_and_drops_stray_frames(tmp_path: Path) -> None:
    spoken = ReplyAudio(tmp_path)
    spoken.frame(b"\x01\x00" * 10)  # before any reply.audio.started: ignored
    spoken.event(ReplyAudioStarted("r1", 8000))
    spoken.frame(b"\x02\x00" * 80)
    spoken.event(ReplyAudioDone("r1", 10, False))
    spoken.frame(b"\x03\x00" * 10)  # after reply.audio.done: ignored
    spoken.event(ReplyAudioStarted("r2", 8000))
    spoken.frame(b"\x04\x00" * 40)
    spoken.close()  # the connection ended mid-reply
    assert [p.name for p in spoken.saved] == ["r1.wav", "r2.cancelled.wav"]
    r1, rate = soundfile.read(str(tmp_path / "r1.wav"), dtype="int16")
    assert rate == 8000 and r1.tolist() == [2] * 80
    r2, _ = soundfile.read(str(tmp_path / "r2.cancelled.wav"), dtype="int16")
    assert r2.tolist() == [4] * 40


class FakeStream:
    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.started = self.closed = False

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def fake_sounddevice(monkeypatch: pytest.MonkeyPatch, stream: Any) -> None:
    module = types.ModuleType("sounddevice")
    module.RawOutputStream = stream  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sounddevice", module)


def test_no_audio_output_means_no_playback_and_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_device(**kwargs: Any) -> None:
        raise RuntimeError("Error querying device -1")  # what PortAudio says without one

    fake_sounddevice(monkeypatch, no_device)
    with caplog.at_level(logging.WARNING, logger="voice_agent.client"):
        assert AudioPlayer.open(16000) is None
    assert len(caplog.records) == 1
    assert "not played" in caplog.records[0].getMessage()
    # and without the package (or PortAudio) at all
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="voice_agent.client"):
        assert AudioPlayer.open(16000) is None
    assert len(caplog.records) == 1


async def test_run_client_goes_on_without_an_audio_output(
    config: Config, speech: Speech, audio_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)
    engine = ScriptedEngine([REPLY], token_delay=0.001)
    out = io.StringIO()
    async with running_server(config, engine, speech=speech) as app:
        path = str(audio_dir / "ldc93s1-16k-mono.wav")
        assert await run_client(app.url, path, speed=0, out=out, play=True) == 0
    lines = out.getvalue().splitlines()
    assert lines[-1].startswith("reply.done r1 ")
    # neither playing nor saving: the client asked the server not to speak
    assert not [line for line in lines if line.startswith("reply.audio")]


def test_player_plays_what_arrives_and_clear_drops_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sounddevice(monkeypatch, FakeStream)
    player = AudioPlayer.open(16000)
    assert player is not None and player.stream.started
    assert player.stream.kwargs["samplerate"] == 16000
    player.write(b"\x05\x00" * 320)  # 20 ms
    assert player.buffered_ms == 20
    out = np.zeros(2 * 480, dtype=np.uint8)  # PortAudio asks for 30 ms
    player.stream.kwargs["callback"](out.data, 480, None, None)  # as PortAudio calls it
    samples = out.view("<i2")
    assert samples[:320].tolist() == [5] * 320 and not samples[320:].any()  # then silence
    player.write(b"\x05\x00" * 320)
    player.clear()  # a cancelled reply: nothing more is heard
    assert player.buffered_ms == 0
    player.close()
    assert player.stream.closed


def test_player_buffer_is_bounded() -> None:
    player = AudioPlayer(FakeStream(), 16000, max_buffered_s=0.1)
    for _ in range(10):
        player.write(b"\x01\x00" * 320)
    assert player.buffered_ms == 100 and player.dropped_bytes == 3200


def test_reply_cancelled_clears_the_player(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sounddevice(monkeypatch, FakeStream)
    player = AudioPlayer.open(16000)
    spoken = ReplyAudio(None, player)
    spoken.event(ReplyAudioStarted("r1", 16000))
    spoken.frame(b"\x01\x00" * 3200)
    assert player is not None and player.buffered_ms == 200
    spoken.event(ReplyCancelled("r1", "barge_in", ""))
    assert player.buffered_ms == 0
    spoken.close()
    assert spoken.saved == []
