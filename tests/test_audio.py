"""audio.py: decoding real files, PCM conversion, framing, clips, streaming resampler."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voice_agent import audio
from voice_agent.errors import BadAudio

AUDIO_DIR = (Path(__file__).parents[1] / "../shared/audio").resolve()
FILES = sorted(p.name for p in AUDIO_DIR.glob("*") if p.suffix in {".wav", ".flac", ".mp3", ".ogg"})


@pytest.fixture(scope="session")
def audio_dir() -> Path:
    if not AUDIO_DIR.is_dir():
        pytest.fail(f"{AUDIO_DIR} not found: tests need ../shared/audio beside the project")
    return AUDIO_DIR


def soxi_seconds(path: Path) -> float:
    if shutil.which("soxi") is None:
        pytest.fail("soxi not installed (apt-get install sox libsox-fmt-mp3)")
    out = subprocess.run(["soxi", "-D", str(path)], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


def test_files_present() -> None:
    assert "jfk.wav" in FILES and "spanish.mp3" in FILES and len(FILES) >= 9


@pytest.mark.parametrize("name", FILES)
def test_decode_matches_soxi_duration(audio_dir: Path, name: str) -> None:
    path = audio_dir / name
    a, info = audio.decode_with_info(path)
    assert a.dtype == np.float32 and a.ndim == 1
    assert float(np.abs(a).max()) <= 1.0 and float(np.abs(a).max()) > 0.01
    expected = soxi_seconds(path)
    tolerance = 0.060 if name.endswith(".mp3") else 0.010
    assert abs(len(a) / 16000 - expected) <= tolerance
    assert abs(info.duration_s - expected) <= tolerance
    assert info.channels == sf.info(str(path)).channels
    assert info.sample_rate == sf.info(str(path)).samplerate


def test_decode_bytes_equals_decode_path(audio_dir: Path) -> None:
    path = audio_dir / "ldc93s1-44k-stereo.wav"
    assert np.array_equal(audio.decode(path.read_bytes()), audio.decode(str(path)))


def test_stereo_and_8k_versions_align_with_16k(audio_dir: Path) -> None:
    ref = audio.decode(audio_dir / "ldc93s1-16k-mono.wav")
    for name in ("ldc93s1-8k-mono.wav", "ldc93s1-44k-stereo.wav"):
        other = audio.decode(audio_dir / name)
        n = min(len(ref), len(other))
        # Same recording: strongly correlated at lag 0 (no resampler shift).
        corr = np.corrcoef(ref[:n], other[:n])[0, 1]
        assert corr > 0.9, (name, corr)


def test_missing_file() -> None:
    with pytest.raises(BadAudio, match=r"^no such file: .*nope\.wav$"):
        audio.decode("/nonexistent/nope.wav")


def test_not_audio_bytes() -> None:
    with pytest.raises(BadAudio, match=r"^cannot decode audio: ") as exc:
        audio.decode(b"this is plainly not audio, just some text" * 10)
    assert "\n" not in str(exc.value) and "Traceback" not in str(exc.value)


def test_not_audio_file(tmp_path: Path) -> None:
    p = tmp_path / "x.wav"
    p.write_text("hello")
    with pytest.raises(BadAudio, match=r"^cannot decode audio: "):
        audio.decode(p)


def test_empty_audio(tmp_path: Path) -> None:
    with pytest.raises(BadAudio, match=r"^audio is empty$"):
        audio.decode(b"")
    buf = io.BytesIO()
    sf.write(buf, np.zeros(0, dtype=np.int16), 16000, format="WAV")
    with pytest.raises(BadAudio, match=r"^audio is empty$"):
        audio.decode(buf.getvalue())


def test_decode_max_seconds(audio_dir: Path) -> None:
    with pytest.raises(BadAudio, match="longer than 5 s"):
        audio.decode(audio_dir / "jfk.wav", max_seconds=5)


@pytest.mark.parametrize(
    ("rate", "channels"), [(7999, 1), (48001, 1), (96000, 2), (16000, 0), (16000, 3)]
)
def test_validate_format_rejects(rate: int, channels: int) -> None:
    with pytest.raises(BadAudio, match="unsupported"):
        audio.validate_format(rate, channels)


def test_validate_format_accepts_range() -> None:
    for rate in (8000, 16000, 44100, 48000):
        for channels in (1, 2):
            audio.validate_format(rate, channels)


def test_pcm16_roundtrip_and_downmix() -> None:
    ints = np.array([0, 1000, -32768, 32767, 16384], dtype="<i2")
    f = audio.pcm16_to_float(ints.tobytes(), 1)
    assert f.dtype == np.float32 and f[2] == -1.0
    assert audio.float_to_pcm16(f) == ints.tobytes()
    stereo = np.array([[1000, 3000], [-2000, 2000]], dtype="<i2").tobytes()
    assert np.allclose(audio.pcm16_to_float(stereo, 2) * 32768, [2000, 0])
    with pytest.raises(BadAudio, match="not a multiple of 4"):
        audio.pcm16_to_float(b"\x00\x00\x00", 2)
    assert (
        audio.float_to_pcm16(np.array([2.0, -2.0], np.float32))
        == np.array([32767, -32768], "<i2").tobytes()
    )


def test_frames_are_640_bytes_and_padded() -> None:
    a = np.full(16000 + 100, 0.5, dtype=np.float32)  # 1 s + 100 samples
    out = list(audio.frames(a))
    assert len(out) == 51
    assert all(len(f) == 640 for f in out)
    last = np.frombuffer(out[-1], "<i2")
    assert np.all(last[:100] == 16384) and np.all(last[100:] == 0)


def test_split_clips() -> None:
    clips = audio.split_clips(audio.silence(35.0))
    assert [len(c) for c in clips] == [30 * 16000, 5 * 16000]
    assert [len(c) for c in audio.split_clips(audio.silence(30.0))] == [30 * 16000]
    assert audio.split_clips(np.zeros(0, np.float32)) == []


def test_resample_length_and_pitch() -> None:
    t = np.arange(44100, dtype=np.float32) / 44100
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    out = audio.resample(tone, 44100, 16000)
    assert len(out) == 16000
    spectrum = np.abs(np.fft.rfft(out))
    assert abs(int(np.argmax(spectrum)) - 440) <= 1  # 1 Hz bins over 1 s


def test_stream_resampler_is_chunk_independent() -> None:
    rng = np.random.default_rng(0)
    pcm = rng.integers(-8000, 8000, size=(44100, 2), dtype=np.int16).tobytes()
    whole = audio.StreamResampler(44100, 2)
    ref = np.concatenate([whole.process(pcm), whole.flush()])
    pieces = audio.StreamResampler(44100, 2)
    parts = [pieces.process(pcm[i : i + 4 * 37]) for i in range(0, len(pcm), 4 * 37)]
    got = np.concatenate([*parts, pieces.flush()])
    assert np.array_equal(ref, got)
    assert len(ref) == 16000 and pieces.in_samples == 44100 and pieces.out_samples == 16000


def test_stream_resampler_rejects_bad_input() -> None:
    with pytest.raises(BadAudio):
        audio.StreamResampler(96000, 1)
    r = audio.StreamResampler(16000, 2)
    with pytest.raises(BadAudio):
        r.process(b"\x00\x00")
    assert r.in_samples == 0


def test_read_wav_pcm16(audio_dir: Path) -> None:
    pcm, rate, channels = audio.read_wav_pcm16(audio_dir / "ldc93s1-44k-stereo.wav")
    assert (rate, channels) == (44100, 2)
    assert len(pcm) == 4 * sf.info(str(audio_dir / "ldc93s1-44k-stereo.wav")).frames
