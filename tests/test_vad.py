"""voice_agent/vad/: the Segmenter on real recordings, fed in chunks of every size."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from voice_agent.errors import BadAudio
from voice_agent.vad import (
    Segmenter,
    SegmenterEvent,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    TurnCheck,
    VadConfig,
)

AUDIO_DIR = (Path(__file__).parents[1] / "../shared/audio").resolve()

# True speech edges of jfk.wav, found once by inspecting 20 ms frame energy:
# background noise sits at about -42 dBFS; the first word starts at 0.32 s
# (-41.7 dB at 0.30 s, -28.5 dB at 0.32 s, -12 dB by 0.38 s); "country" ends
# at 10.22 s (below -30 dB from there on; what follows up to 11.0 s is crowd
# noise). Pauses of 1.15 s (2.13-3.28 s) and 1.10 s (4.31-5.41 s) and 0.51 s
# (7.68-8.19 s) separate the phrases.
JFK_START_MS = 320
JFK_END_MS = 10220
JFK_PAUSES_MS = [(2130, 3280), (4310, 5410), (7520, 8190)]
PAD_MS = 1000


def load_pcm(name: str, pad_s: float = 0.0) -> tuple[bytes, int, int]:
    path = AUDIO_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} not found: tests need ../shared/audio beside the project")
    data, rate = sf.read(str(path), dtype="int16", always_2d=True)
    pad = np.zeros((int(pad_s * rate), data.shape[1]), dtype=np.int16)
    return np.concatenate([pad, data, pad]).tobytes(), int(rate), int(data.shape[1])


def run(
    pcm: bytes,
    rate: int = 16000,
    channels: int = 1,
    config: VadConfig | None = None,
    chunk: int | None = None,
) -> tuple[list[SegmenterEvent], Segmenter]:
    seg = Segmenter(config or VadConfig(), rate, channels)
    events: list[SegmenterEvent] = []
    step = chunk or len(pcm) or 1
    for i in range(0, len(pcm), step):
        events += seg.feed(pcm[i : i + step])
    events += seg.flush()
    check_pairs(events)
    return events, seg


def check_pairs(events: list[SegmenterEvent]) -> None:
    """Ids count 1, 2, 3...; every SpeechStarted is followed by one SpeechStopped."""
    open_id: int | None = None
    expected = 1
    for e in events:
        if isinstance(e, SpeechStarted):
            assert open_id is None and e.utterance_id == expected
            open_id, start = e.utterance_id, e.start_ms
        else:
            assert open_id == e.utterance_id and e.start_ms == start
            assert e.end_ms > e.start_ms
            open_id = None
            expected += 1
    assert open_id is None


def stops(events: list[SegmenterEvent]) -> list[SpeechStopped]:
    return [e for e in events if isinstance(e, SpeechStopped)]


def edges(events: list[SegmenterEvent]) -> list[tuple[int, int]]:
    return [(e.start_ms, e.end_ms) for e in stops(events)]


def test_jfk_is_one_utterance_with_accurate_edges() -> None:
    # jfk.wav's pauses last up to 1.15 s, so it is one utterance only with a
    # hangover longer than that; 600 ms splits it (next test). With
    # such a hangover the crowd noise of 10.7-11.0 s (as loud as the speech,
    # and speech to webrtcvad) joins the utterance, so the end may reach 11.0 s.
    pcm, rate, ch = load_pcm("jfk.wav", pad_s=1.0)
    events, seg = run(pcm + bytes(32000), rate, ch, VadConfig(hangover_ms=1500))
    [utt] = stops(events)
    assert utt.reason == "silence"
    assert abs(utt.start_ms - (PAD_MS + JFK_START_MS)) <= 150
    assert PAD_MS + JFK_END_MS - 150 <= utt.end_ms <= PAD_MS + 11000
    assert seg.position_ms == 14000


def test_jfk_with_a_600_ms_hangover_splits_only_inside_real_pauses() -> None:
    pcm, rate, ch = load_pcm("jfk.wav", pad_s=1.0)
    events, _ = run(pcm, rate, ch, VadConfig(hangover_ms=600))  # the listed pauses are >= 600
    found = edges(events)
    assert len(found) >= 3
    assert abs(found[0][0] - (PAD_MS + JFK_START_MS)) <= 150
    assert abs(found[-1][1] - (PAD_MS + JFK_END_MS)) <= 150
    pauses = [(a + PAD_MS - 150, b + PAD_MS + 150) for a, b in JFK_PAUSES_MS]
    for (_, end), (start, _) in itertools.pairwise(found):
        assert any(lo <= end and start <= hi for lo, hi in pauses), (end, start)
    assert all(u.reason == "silence" for u in stops(events))


def test_three_clips_give_three_utterances() -> None:
    gap = np.zeros(int(1.5 * 16000), dtype=np.int16).tobytes()
    clips = [
        load_pcm(n)[0]
        for n in (
            "ldc93s1-16k-mono.wav",
            "new-home-in-the-stars-16k.wav",
            "librispeech-1272-128104-0000.flac",
        )
    ]
    starts_ms, t = [], 1500
    for c in clips:
        starts_ms.append(t)
        t += len(c) // 32 + 1500
    events, _ = run(gap + gap.join(clips) + gap)
    found = edges(events)
    assert len(found) == 3
    for (start, end), clip_start, c in zip(found, starts_ms, clips, strict=True):
        assert clip_start - 20 <= start < end <= clip_start + len(c) // 32 + 150


def test_other_rates_and_channels_give_the_same_boundaries() -> None:
    ref, _ = run(load_pcm("ldc93s1-16k-mono.wav", 1.0)[0])
    [(ref_start, ref_end)] = edges(ref)
    assert abs(ref_start - 1200) <= 100  # speech starts at ~0.2 s in the file
    for name in ("ldc93s1-8k-mono.wav", "ldc93s1-44k-stereo.wav"):
        pcm, rate, ch = load_pcm(name, 1.0)
        events, seg = run(pcm, rate, ch)
        [(start, end)] = edges(events)
        assert abs(start - ref_start) <= 30, name
        assert abs(end - ref_end) <= 30, name
        assert abs(seg.position_ms - 4925) <= 1


@pytest.mark.parametrize(
    ("name", "rate_chunks"),
    [("jfk.wav", [2, 640, 1000, 3202, 16000]), ("ldc93s1-44k-stereo.wav", [4, 1764, 4412, 40000])],
)
def test_chunk_size_does_not_change_anything(name: str, rate_chunks: list[int]) -> None:
    pcm, rate, ch = load_pcm(name, 1.0)
    whole, _ = run(pcm, rate, ch)
    assert whole
    for chunk in rate_chunks:
        events, _ = run(pcm, rate, ch, chunk=chunk)
        assert len(events) == len(whole), chunk
        for a, b in zip(events, whole, strict=True):
            assert type(a) is type(b) and a.utterance_id == b.utterance_id
            assert a.start_ms == b.start_ms
            if isinstance(a, SpeechStopped) and isinstance(b, SpeechStopped):
                assert (a.end_ms, a.reason) == (b.end_ms, b.reason)
                assert np.array_equal(a.audio, b.audio)


def test_random_chunks_match_whole() -> None:
    pcm, rate, ch = load_pcm("ldc93s1-8k-mono.wav", 1.0)
    whole, _ = run(pcm, rate, ch)
    rng = np.random.default_rng(1)
    seg = Segmenter(VadConfig(), rate, ch)
    events: list[SegmenterEvent] = []
    i = 0
    while i < len(pcm):
        n = 2 * int(rng.integers(1, 2000))
        events += seg.feed(pcm[i : i + n])
        i += n
    events += seg.flush()
    assert edges(events) == edges(whole) and len(edges(whole)) == 1


def test_short_burst_is_dropped_and_counted() -> None:
    pcm, _, _ = load_pcm("jfk.wav")
    burst = pcm[2 * 6400 : 2 * 8000]  # 100 ms of loud speech (0.40-0.50 s)
    silence = bytes(2 * 16000)
    events, seg = run(silence + burst + silence)
    assert events == []
    assert seg.dropped == 1
    # The same audio, longer than min_speech_ms, is speech.
    events, seg = run(silence + pcm[2 * 6400 : 2 * 12800] + silence)
    assert len(stops(events)) == 1 and seg.dropped == 0


def long_speech(seconds: float) -> bytes:
    """Continuous speech: the LibriSpeech sentence without its edges, repeated."""
    pcm, _, _ = load_pcm("librispeech-1272-128104-0000.flac")
    core = pcm[2 * int(0.55 * 16000) : 2 * int(5.40 * 16000)]
    reps = int(seconds * 32000 / len(core)) + 1
    return (core * reps)[: int(seconds * 32000)]


def test_long_speech_is_closed_at_max_length_and_continues() -> None:
    pcm = bytes(2 * 16000) + long_speech(35.0) + bytes(2 * 16000)
    events, _ = run(pcm)
    utts = stops(events)
    assert len(utts) == 2
    first, second = utts
    assert first.reason == "max_length"
    assert len(first.audio) <= 30 * 16000  # pre-roll included, fits the encoder
    assert len(first.audio) >= 29 * 16000
    assert second.start_ms == first.end_ms and second.utterance_id == 2
    assert second.reason in ("silence", "end_of_stream")
    assert abs(second.end_ms - 36000) <= 300


def test_max_length_small_config_continues_repeatedly() -> None:
    pcm = bytes(2 * 16000) + long_speech(7.0) + bytes(2 * 16000)
    cfg = VadConfig(max_utterance_ms=2000, preroll_ms=200)
    events, _ = run(pcm, config=cfg)
    utts = stops(events)
    assert [u.reason for u in utts[:-1]] == ["max_length"] * (len(utts) - 1)
    assert len(utts) >= 4
    for a, b in itertools.pairwise(utts):
        assert b.start_ms == a.end_ms
    assert all(len(u.audio) <= 2000 * 16 for u in utts)


def test_commit_closes_at_once() -> None:
    pcm, _, _ = load_pcm("ldc93s1-16k-mono.wav", 1.0)
    seg = Segmenter()
    events = seg.feed(pcm[: 2 * 16000 * 2])  # 2.0 s: speech is going on
    assert [type(e) for e in events] == [SpeechStarted]
    assert seg.in_speech and seg.speech_ms >= 200
    [stopped] = seg.commit()
    assert isinstance(stopped, SpeechStopped) and stopped.reason == "commit"
    assert stopped.utterance_id == 1 and stopped.end_ms <= 2000
    assert not seg.in_speech and seg.speech_ms == 0
    assert seg.commit() == []


def test_commit_of_short_speech_still_closes_it() -> None:
    pcm, _, _ = load_pcm("jfk.wav")
    seg = Segmenter()
    assert seg.feed(bytes(32000) + pcm[2 * 6400 : 2 * 8000]) == []  # 100 ms burst
    assert seg.in_speech
    started, stopped = seg.commit()
    assert isinstance(started, SpeechStarted) and isinstance(stopped, SpeechStopped)
    assert stopped.reason == "commit" and stopped.utterance_id == started.utterance_id == 1
    assert seg.dropped == 0


def test_commit_without_speech_is_empty() -> None:
    seg = Segmenter()
    assert seg.feed(bytes(32000)) == []
    assert seg.commit() == []


def test_flush_closes_with_end_of_stream() -> None:
    pcm, _, _ = load_pcm("ldc93s1-16k-mono.wav", 1.0)
    seg = Segmenter()
    seg.feed(pcm[: 2 * 16000 * 3])
    [stopped] = seg.flush()
    assert isinstance(stopped, SpeechStopped) and stopped.reason == "end_of_stream"
    assert seg.flush() == []


def test_odd_byte_count_is_rejected_without_state_change() -> None:
    pcm, _, _ = load_pcm("ldc93s1-16k-mono.wav", 1.0)
    ref, _ = run(pcm)
    seg = Segmenter()
    events = seg.feed(pcm[:32000])
    with pytest.raises(BadAudio, match="multiple of 2"):
        seg.feed(b"\x01\x02\x03")
    assert seg.position_ms == 1000
    events += seg.feed(pcm[32000:])
    events += seg.flush()
    assert edges(events) == edges(ref) and len(edges(ref)) == 1
    stereo = Segmenter(sample_rate=44100, channels=2)
    with pytest.raises(BadAudio, match="multiple of 4"):
        stereo.feed(b"\x00" * 6)
    assert stereo.position_ms == 0


@pytest.mark.parametrize(("rate", "channels"), [(4000, 1), (96000, 1), (16000, 3)])
def test_unsupported_format(rate: int, channels: int) -> None:
    with pytest.raises(BadAudio, match="unsupported"):
        Segmenter(sample_rate=rate, channels=channels)


def test_preroll_is_included() -> None:
    pcm, _, _ = load_pcm("new-home-in-the-stars-16k.wav", 1.0)
    for preroll in (0, 300, 500):
        events, _ = run(pcm, config=VadConfig(preroll_ms=preroll))
        [utt] = stops(events)
        audio_ms = len(utt.audio) / 16
        speech_ms = utt.end_ms - utt.start_ms
        assert speech_ms + preroll <= audio_ms <= speech_ms + preroll + 100
        # The audio starts `preroll` ms before the onset, sample for sample.
        first = (utt.start_ms - preroll) * 16
        source = np.frombuffer(pcm, "<i2")[first : first + len(utt.audio)] / 32768
        assert np.array_equal(utt.audio, source.astype(np.float32))


def test_speech_ms_and_in_speech_track_the_utterance() -> None:
    pcm, _, _ = load_pcm("ldc93s1-16k-mono.wav", 1.0)
    seg = Segmenter()
    seen = []
    for i in range(0, len(pcm), 640):
        for e in seg.feed(pcm[i : i + 640]):
            if isinstance(e, SpeechStarted):
                seen.append(seg.speech_ms)
        assert (seg.speech_ms > 0) == seg.in_speech
    assert len(seen) == 1 and seen[0] >= 200


def test_times_come_from_sample_counts() -> None:
    seg = Segmenter(sample_rate=8000)
    seg.feed(bytes(2 * 8000 * 3 + 2 * 7))  # 3 s + 7 samples
    assert seg.position_ms == 3000
    seg.feed(bytes(2 * 8))
    assert seg.position_ms == 3001


def test_pause_events_carry_the_audio_the_utterance_closes_with() -> None:
    pcm, rate, ch = load_pcm("ldc93s1-16k-mono.wav", pad_s=1.0)
    seg = Segmenter(VadConfig(), rate, ch, pause_events=True)
    events = seg.feed(pcm) + seg.flush()
    [stop] = stops(events)
    paused = [e for e in events if isinstance(e, SpeechPaused)]
    assert paused and all(p.utterance_id == stop.utterance_id for p in paused)
    assert events.index(paused[-1]) < events.index(stop)
    assert np.array_equal(paused[-1].audio, stop.audio)
    # without pause_events: the same utterance, and no SpeechPaused
    plain, _ = run(pcm, rate, ch)
    assert edges(plain) == [(stop.start_ms, stop.end_ms)]
    assert not [e for e in plain if isinstance(e, SpeechPaused)]


def test_speech_resuming_after_a_pause_makes_the_pause_audio_stale() -> None:
    clip, rate, _ = load_pcm("ldc93s1-16k-mono.wav")
    word = clip[2 * rate * 200 // 1000 : 2 * rate * 2780 // 1000]  # the speech only
    gap = bytes(2 * rate * 300 // 1000)  # 300 ms: shorter than the 600 ms hangover
    pad = bytes(2 * rate)
    seg = Segmenter(VadConfig(hangover_ms=600), rate, 1, pause_events=True)
    events = seg.feed(pad + word + gap + word + pad) + seg.flush()
    [stop] = stops(events)
    paused = [e for e in events if isinstance(e, SpeechPaused)]
    assert len(paused) >= 2  # one in the 300 ms gap, one at the end
    assert len(paused[0].audio) < len(stop.audio)
    assert np.array_equal(paused[-1].audio, stop.audio)


# ---------------------------------------------------------------- silero


def float_pcm(name: str) -> bytes:
    from voice_agent.audio import decode, float_to_pcm16

    path = AUDIO_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} not found: tests need ../shared/audio beside the project")
    return float_to_pcm16(decode(str(path)))


def test_silero_finds_the_same_speech_as_webrtcvad() -> None:
    pcm, rate, ch = load_pcm("jfk.wav", PAD_MS / 1000)
    events, _ = run(pcm, rate, ch, VadConfig(vad="silero", hangover_ms=1500))
    (start, end), *rest = edges(events)
    assert not rest
    assert abs(start - (JFK_START_MS + PAD_MS)) <= 100
    # silero hears the crowd after "country" (voices) until the recording ends at 11 s
    assert JFK_END_MS + PAD_MS - 100 <= end <= 11000 + PAD_MS


def test_silero_hears_no_speech_in_music_or_breaking_glass() -> None:
    for name in ("music.wav", "glass-breaking.mp3"):
        events, _ = run(float_pcm(name), config=VadConfig(vad="silero"))
        assert events == [], name
    # webrtcvad, by contrast, takes music for speech
    events, _ = run(float_pcm("music.wav")[: 20 * 32000])
    assert stops(events)


def test_unknown_vad_is_rejected() -> None:
    with pytest.raises(ValueError):
        Segmenter(VadConfig(vad="nope"))


# ---------------------------------------------------------------- end-of-turn checks


def turn_events(pcm: bytes, config: VadConfig) -> list[SegmenterEvent]:
    seg = Segmenter(config)
    return seg.feed(pcm) + seg.flush()


def test_turn_checks_come_at_min_silence_and_at_each_recheck() -> None:
    pcm, _, _ = load_pcm("ldc93s1-16k-mono.wav", pad_s=2.0)
    cfg = VadConfig(turn_check=True, min_silence_ms=200, recheck_ms=(400, 800), max_silence_ms=1500)
    events = turn_events(pcm, cfg)
    checks = [e for e in events if isinstance(e, TurnCheck)]
    assert [c.silence_ms for c in checks] == [200, 400, 800]
    assert len({(c.utterance_id, c.check) for c in checks}) == 1  # one pause, asked three times
    # each carries the utterance so far, the silence heard until then included
    assert len(checks[1].audio) - len(checks[0].audio) == 200 * 16
    assert len(checks[2].audio) - len(checks[1].audio) == 400 * 16
    [stop] = stops(events)  # nobody answered: closed at max_silence
    assert stop.reason == "silence" and stop.end_ms == (checks[0].check + 1) * 20
    order = [id(e) for e in events]
    assert order.index(id(checks[-1])) < order.index(id(stop))


def test_an_answer_to_a_recheck_closes_the_turn() -> None:
    pcm, _, _ = load_pcm("ldc93s1-16k-mono.wav", pad_s=2.0)
    cfg = VadConfig(turn_check=True, min_silence_ms=200, recheck_ms=(400,), max_silence_ms=1500)
    seg = Segmenter(cfg)
    events: list[SegmenterEvent] = []
    closed_at = 0
    for i in range(0, len(pcm), 640):
        got = seg.feed(pcm[i : i + 640])
        for c in [e for e in got if isinstance(e, TurnCheck)]:
            complete = c.silence_ms == 400  # "unfinished" at 200 ms, "finished" at 400 ms
            got += seg.turn_decision(c.utterance_id, c.check, c.silence_ms / 1000, complete)
        if stops(got):
            closed_at = seg.position_ms
        events += got
    [stop] = stops(events)
    assert stop.reason == "end_of_turn" and stop.eot_probability == 0.4
    assert 400 <= closed_at - stop.end_ms <= 420  # at the recheck, long before max_silence


def test_speech_resuming_ends_the_rechecks_of_that_pause() -> None:
    clip, rate, _ = load_pcm("ldc93s1-16k-mono.wav")
    speech = clip[2 * rate * 200 // 1000 : 2 * rate * 2780 // 1000]
    gap = bytes(2 * rate * 500 // 1000)  # 500 ms: past the 400 ms recheck, not the 800 ms one
    pcm = bytes(2 * rate) + speech + gap + speech + bytes(2 * rate * 2)
    cfg = VadConfig(turn_check=True, min_silence_ms=200, recheck_ms=(400, 800), max_silence_ms=1500)
    checks = [e for e in turn_events(pcm, cfg) if isinstance(e, TurnCheck)]
    first = [c.silence_ms for c in checks if c.check == checks[0].check]
    later = [c.silence_ms for c in checks if c.check != checks[0].check]
    assert first == [200, 400] and later == [200, 400, 800]


@pytest.mark.parametrize("recheck", [200, 100, 1500, 2000])
def test_rechecks_outside_the_pause_window_are_rejected(recheck: int) -> None:
    cfg = VadConfig(turn_check=True, min_silence_ms=200, recheck_ms=(recheck,), max_silence_ms=1500)
    with pytest.raises(ValueError):
        Segmenter(cfg)


def test_one_frame_fast_path_matches_the_general_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """20 ms frames (what clients send) take _one_frame; bigger chunks take
    the general path: the same webrtcvad calls, so the same events."""
    pcm, rate, ch = load_pcm("jfk.wav", 1.0)
    general, _ = run(pcm, rate, ch, chunk=64000)
    calls = 0
    original = Segmenter._one_frame

    def counted(self: Segmenter, frame: bytes) -> list[SegmenterEvent]:
        nonlocal calls
        calls += 1
        return original(self, frame)

    monkeypatch.setattr(Segmenter, "_one_frame", counted)
    fast, _ = run(pcm, rate, ch, chunk=640)
    assert calls == len(pcm) // 640
    assert [(type(e), e.utterance_id, e.start_ms) for e in fast] == [
        (type(e), e.utterance_id, e.start_ms) for e in general
    ]
    assert [(e.end_ms, e.reason) for e in stops(fast)] == [
        (e.end_ms, e.reason) for e in stops(general)
    ]
    assert len(stops(general)) >= 1
