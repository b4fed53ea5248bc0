"""turn.py and the end-of-turn path through Segmenter, Session and LiveSession,
on real recordings with the real Smart Turn v3.2 model (the `turn` extra)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest

from voice_agent import turn
from voice_agent.audio import decode, float_to_pcm16
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import ConfigError, ModelLoadError
from voice_agent.live import LiveSession, session_config
from voice_agent.protocol import ServerEvent, SpeechStartedEvent, SpeechStoppedEvent, encode
from voice_agent.session import (
    Action,
    CancelTurn,
    DetectTurn,
    Send,
    Session,
    SessionConfig,
    SubmitTurn,
)
from voice_agent.turn import (
    N_FRAMES,
    N_MELS,
    WINDOW_SAMPLES,
    SmartTurn,
    TurnBatcher,
    last_window,
    load_detector,
    parse_rechecks,
    threshold_at,
)
from voice_agent.vad import Segmenter, SpeechStopped, TurnCheck, VadConfig, package_data_path

AUDIO_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "audio"
RATE = 16000
CHUNK = 640  # 20 ms of 16 kHz PCM16

# jfk.wav: "country" ends at 10.22 s; inside the sentence, word boundaries at
# 4.34 s ("ask not | what"), 5.88 s and 7.62 s (see tests/test_vad.py).
JFK_END_S = 10.22
# ... but "country" fades out until about 10.4 s (the VAD stops hearing it
# before the model does): the model calls the sentence finished from there.
JFK_HEARD_END_S = 10.6
JFK_CUTS_S = (4.34, 5.88, 7.62)
# librispeech-1272-128104-0000: speech ends at 5.42 s; 4.08 s lies between
# "glad to" and "welcome his gospel".
LIBRI = "librispeech-1272-128104-0000.flac"
LIBRI_END_S = 5.42
LIBRI_CUT_S = 4.08
# ldc93s1 "She had your dark suit in greasy wash water all year.": the model is
# sure it is finished (0.98-0.99 at every check; librispeech's end gets 0.94).
LDC = "ldc93s1-16k-mono.wav"

TURN_CFG = VadConfig(turn_check=True)  # min_silence 200 ms, max_silence 1500 ms


def audio(name: str) -> np.ndarray:
    path = AUDIO_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} not found: tests need ../shared/audio beside the project")
    return decode(str(path))


def zeros(seconds: float) -> np.ndarray:
    return np.zeros(round(seconds * RATE), np.float32)


def upto(a: np.ndarray, seconds: float) -> np.ndarray:
    return a[: round(seconds * RATE)]


@pytest.fixture(scope="module")
def detector() -> SmartTurn:
    """The bundled model; missing is a failure, not a skip (make test installs it)."""
    found = load_detector("model")
    assert isinstance(found, SmartTurn)
    return found


# ------------------------------------------------------------ the detector


def test_features_are_the_model_input_and_pad_at_the_start(detector: SmartTurn) -> None:
    a = audio("jfk.wav")
    w = last_window(a)
    assert len(w) == WINDOW_SAMPLES
    np.testing.assert_array_equal(w, a[-WINDOW_SAMPLES:])  # keeps the end of a long clip
    short = last_window(a[:RATE])
    assert not short[:-RATE].any()  # a short clip is padded with zeros in front
    np.testing.assert_array_equal(short[-RATE:], a[:RATE])
    feats = detector.features([a, a[:RATE]])
    assert feats.shape == (2, N_MELS, N_FRAMES) and feats.dtype == np.float32
    # Whisper scaling: log10 clamped to 8 below the maximum, then (x + 4) / 4
    for f in feats:
        assert f.max() - f.min() <= 2.0 + 1e-5


@pytest.mark.parametrize("seconds", [11.0, 2.0])
def test_features_match_transformers_on_a_real_clip(detector: SmartTurn, seconds: float) -> None:
    """Ours (one batched FFT) against transformers' WhisperFeatureExtractor as
    Smart Turn's reference inference calls it: the last 8 s, zeros in FRONT of
    a shorter clip, then do_normalize over the whole window."""
    from transformers import WhisperFeatureExtractor

    clip = upto(audio("jfk.wav"), seconds)
    fe = WhisperFeatureExtractor(chunk_length=8)  # type: ignore[no-untyped-call]
    ref = fe(
        last_window(clip),
        sampling_rate=RATE,
        return_tensors="np",
        padding="max_length",
        max_length=WINDOW_SAMPLES,
        truncation=True,
        do_normalize=True,
    )["input_features"][0]
    ours = detector.features([clip])[0]
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # the other padding (speech first, zeros after) is a different input
    if seconds < 8:
        behind = np.concatenate([clip, np.zeros(WINDOW_SAMPLES - len(clip), np.float32)])
        assert np.abs(detector.features([behind])[0] - ref).max() > 0.5


def test_whole_sentences_are_complete_and_cuts_are_not(detector: SmartTurn) -> None:
    jfk, libri = audio("jfk.wav"), audio(LIBRI)
    pause = zeros(0.2)  # what the detector hears at min_silence
    # a finished sentence: the recording itself up to 200 ms after the last word
    whole = [upto(jfk, JFK_HEARD_END_S), upto(libri, LIBRI_END_S + 0.2)]
    cuts = [np.concatenate([upto(jfk, s), pause]) for s in JFK_CUTS_S]
    cuts.append(np.concatenate([upto(libri, LIBRI_CUT_S), pause]))
    p_whole = detector.predict(whole)
    p_cut = detector.predict(cuts)
    assert all(p > 0.6 for p in p_whole), p_whole
    assert all(p < 0.2 for p in p_cut), p_cut


def test_a_batch_gives_what_single_calls_give(detector: SmartTurn) -> None:
    jfk = audio("jfk.wav")
    clips = [upto(jfk, JFK_HEARD_END_S), upto(jfk, 4.5)]
    batch = detector.predict(clips)
    single = [detector.predict([c])[0] for c in clips]
    np.testing.assert_allclose(batch, single, atol=1e-4)
    assert batch[0] > 0.5 > batch[1]


async def test_checks_that_arrive_together_share_one_model_call(detector: SmartTurn) -> None:
    batcher = TurnBatcher(detector)
    jfk = audio("jfk.wav")
    clips = [
        upto(jfk, JFK_HEARD_END_S),
        np.concatenate([upto(jfk, 4.34), zeros(0.2)]),
        np.concatenate([upto(jfk, 7.62), zeros(0.2)]),
    ]
    probs = await asyncio.wait_for(
        asyncio.gather(*(batcher.probability(c) for c in clips)), timeout=120
    )
    assert (batcher.batches, batcher.checks) == (1, 3)
    assert probs[0] is not None and probs[0] > 0.5
    assert all(p is not None and p < 0.5 for p in probs[1:])


# ------------------------------------------------------------ the decision schedule


def test_rechecks_parse_and_pick_the_threshold_of_each_check() -> None:
    assert parse_rechecks("") == ()
    assert parse_rechecks("400:0.8, 800:0.6") == ((400, 0.8), (800, 0.6))
    for bad in ("400", "400:x", "400:1.5", "800:0.6,400:0.8", "400:0.8,400:0.7"):
        with pytest.raises(ValueError):
            parse_rechecks(bad)
    sched = parse_rechecks("400:0.8,800:0.6")
    assert [threshold_at(ms, 0.95, sched) for ms in (0, 200, 399, 400, 600, 800, 1400)] == [
        0.95, 0.95, 0.95, 0.8, 0.8, 0.6, 0.6
    ]  # fmt: skip
    assert threshold_at(800, 0.5) == 0.5  # no schedule: one threshold


def test_config_checks_and_wires_the_schedule(detector: SmartTurn) -> None:
    for bad in ("100:0.5", "1500:0.5", "400:0.5,300:0.4", "400"):
        with pytest.raises(ConfigError):
            Config(turn_rechecks=bad)
    cfg = session_config(
        Config(turn_detection="model", turn_threshold=0.9, turn_rechecks="400:0.8,800:0.6")
    )
    assert cfg.vad.recheck_ms == (400, 800) and cfg.turn_threshold == 0.9
    assert cfg.turn_rechecks == ((400, 0.8), (800, 0.6))
    plain = session_config(Config(turn_detection="silence", turn_rechecks="400:0.8"))
    assert not plain.vad.turn_check and plain.vad.recheck_ms == ()


class Constant:
    """A detector that always answers `p` (the schedule, not the model, decides)."""

    name = "constant"

    def __init__(self, p: float) -> None:
        self.p = p

    def predict(self, clips: list[np.ndarray]) -> list[float]:
        return [self.p] * len(clips)


SCHEDULE = VadConfig(turn_check=True, min_silence_ms=200, recheck_ms=(400, 800))


@pytest.mark.parametrize(
    ("p", "reason", "closed_after_ms"),
    [(0.97, "end_of_turn", 200), (0.8, "end_of_turn", 400), (0.6, "end_of_turn", 800),
     (0.4, "silence", 1500)],
)  # fmt: skip
def test_the_first_check_whose_threshold_is_met_closes_the_turn(
    p: float, reason: str, closed_after_ms: int
) -> None:
    cfg = SessionConfig(vad=SCHEDULE, turn_threshold=0.95, turn_rechecks=((400, 0.8), (800, 0.6)))
    s = Session("s1", cfg)
    a = np.concatenate([zeros(0.5), audio(LIBRI), zeros(2.0)])
    _, stops, at = drive_silences(s, a, Constant(p))
    assert [e.reason for e in stops] == [reason]
    assert closed_after_ms <= at[0] - stops[0].end_ms <= closed_after_ms + 20
    assert stops[0].eot_probability == p


def drive_silences(
    s: Session, a: np.ndarray, detector: Constant
) -> tuple[list[Action], list[SpeechStoppedEvent], list[int]]:
    """As drive(), passing each DetectTurn's silence back as the driver does."""
    pcm = float_to_pcm16(a)
    actions: list[Action] = []
    at: list[int] = []
    for i in range(0, len(pcm), CHUNK):
        got = s.feed_audio(pcm[i : i + CHUNK])
        for act in list(got):
            if isinstance(act, DetectTurn):
                p = detector.predict([act.audio])[0]
                got += s.on_turn_decision(act.utterance_id, act.check, p, act.silence_ms)
        actions += got
        at += [s.position_ms for a in got if isinstance(a, Send) and is_stop(a.event)]
    stops = [a.event for a in actions if isinstance(a, Send) and is_stop(a.event)]
    return actions, stops, at  # type: ignore[return-value]


async def test_live_session_passes_each_checks_silence_to_the_schedule() -> None:
    """The first check's threshold (1.0) is never met; only the recheck at
    400 ms can close the turn, so the driver must report which check it was."""
    sent: list[ServerEvent] = []
    done = asyncio.Event()

    async def send(event: ServerEvent) -> None:
        sent.append(event)
        if isinstance(event, SpeechStoppedEvent):
            done.set()

    cfg = SessionConfig(
        vad=SCHEDULE, turn_threshold=1.0, turn_rechecks=((400, 0.5),), turn_detector=Constant(0.6)
    )
    live = LiveSession(ScriptedEngine(["OK."]), send, session_id="s1", config=cfg)
    try:
        pcm = float_to_pcm16(np.concatenate([zeros(0.5), audio(LIBRI), zeros(0.6)]))
        for i in range(0, len(pcm), CHUNK):
            await live.feed_audio(pcm[i : i + CHUNK])
        await asyncio.wait_for(done.wait(), timeout=30)
    finally:
        await live.close()
    stops = [e for e in sent if isinstance(e, SpeechStoppedEvent)]
    assert [(e.reason, e.eot_probability) for e in stops] == [("end_of_turn", 0.6)]


# ------------------------------------------------------------ loading and fallback


def test_fallback_without_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(turn, "BUNDLED_DIST", "no-such-distribution")
    assert turn.bundled_model_path() is None
    assert load_detector("auto") is None
    with pytest.raises(ConfigError):
        load_detector("model")
    assert "silence alone (600 ms hangover)" in turn.describe(None, 600)
    cfg = session_config(Config(turn_detection="auto"))
    assert cfg.turn_detector is None and not cfg.vad.turn_check
    assert Config().turn_detection == "silence"  # the default: the model is opt-in


def test_silence_mode_ends_on_the_hangover_without_checks() -> None:
    cfg = session_config(Config(turn_detection="silence", hangover_ms=600))
    assert cfg.turn_detector is None and not cfg.vad.turn_check
    s = Session("s1", cfg)
    libri = np.concatenate([zeros(0.5), audio(LIBRI), zeros(1.5)])
    actions, stops, _ = drive(s, libri, None)
    assert not any(isinstance(a, DetectTurn) for a in actions)
    assert [e.reason for e in stops] == ["silence"]
    assert stops[0].eot_probability is None


def test_turn_model_flag_takes_a_file_and_rejects_others(detector: SmartTurn) -> None:
    with pytest.raises(ConfigError):
        load_detector("auto", "/nonexistent/smart-turn.onnx")
    assert load_detector("auto", detector.path) is detector  # one per file and process
    silero = package_data_path("silero-vad", "silero_vad/data/silero_vad.onnx")
    assert silero is not None, "silero-vad is part of the turn extra"
    with pytest.raises(ModelLoadError):
        load_detector("auto", str(silero))  # an ONNX file, but not Smart Turn
    cfg = session_config(Config(turn_detection="auto", turn_model=detector.path))
    assert cfg.turn_detector is detector and cfg.vad.turn_check


# ------------------------------------------------------------ through the Session


def drive(
    s: Session, a: np.ndarray, detector: SmartTurn | None, answer: bool = True
) -> tuple[list[Action], list[SpeechStoppedEvent], list[int]]:
    """Feed in 20 ms chunks, answering each DetectTurn at once (as if the model
    took no time). Returns actions, speech.stopped events and the position (ms)
    at which each was emitted."""
    pcm = float_to_pcm16(a)
    actions: list[Action] = []
    at: list[int] = []
    for i in range(0, len(pcm), CHUNK):
        got = s.feed_audio(pcm[i : i + CHUNK])
        for act in list(got):
            if isinstance(act, DetectTurn) and answer:
                p = detector.predict([act.audio])[0] if detector is not None else None
                got += s.on_turn_decision(act.utterance_id, act.check, p)
        actions += got
        at += [s.position_ms for a in got if isinstance(a, Send) and is_stop(a.event)]
    stops = [a.event for a in actions if isinstance(a, Send) and is_stop(a.event)]
    return actions, stops, at  # type: ignore[return-value]


def is_stop(e: ServerEvent) -> bool:
    return isinstance(e, SpeechStoppedEvent)


def test_the_default_policy_is_the_benchmarks_pick() -> None:
    """benchmarks/turn_segments.py picks one check at 200 ms, p >= 0.97, 1500 ms at most
    (docs/benchmarks/turn-segments.json); the server and the Session default to it."""
    cfg = Config()
    assert (cfg.min_silence_ms, cfg.turn_threshold, cfg.turn_rechecks, cfg.max_silence_ms) == (
        200, 0.97, "", 1500
    )  # fmt: skip
    assert SessionConfig().turn_threshold == cfg.turn_threshold
    assert (VadConfig().min_silence_ms, VadConfig().max_silence_ms) == (200, 1500)


def test_a_sentence_the_model_is_sure_of_closes_at_min_silence(detector: SmartTurn) -> None:
    s = Session("s1", SessionConfig(vad=TURN_CFG, turn_detector=detector))  # the default policy
    a = np.concatenate([zeros(0.5), audio(LDC), zeros(2.0)])
    actions, stops, at = drive(s, a, detector)
    assert [e.reason for e in stops] == ["end_of_turn"]
    assert stops[0].eot_probability is not None and stops[0].eot_probability >= 0.97
    assert at[0] - stops[0].end_ms <= 240  # closed at 200 ms of silence, not 1500
    assert sum(isinstance(x, SubmitTurn) for x in actions) == 1
    wire = json.loads(encode(stops[0]))
    assert wire["reason"] == "end_of_turn" and wire["eot_probability"] == stops[0].eot_probability


def test_a_pause_inside_the_sentence_does_not_end_the_turn(detector: SmartTurn) -> None:
    # even at the lax threshold 0.5 (the model says 0.01 at this pause, 0.94 at the end)
    s = Session("s1", SessionConfig(vad=TURN_CFG, turn_threshold=0.5, turn_detector=detector))
    libri = audio(LIBRI)
    cut = round(LIBRI_CUT_S * RATE)
    a = np.concatenate([zeros(0.5), libri[:cut], zeros(1.0), libri[cut:], zeros(2.0)])
    actions, stops, _ = drive(s, a, detector)
    checks = [x for x in actions if isinstance(x, DetectTurn)]
    assert len(checks) >= 2  # asked at the pause and again at the end
    assert len(stops) == 1, [(e.start_ms, e.end_ms, e.reason) for e in stops]
    assert stops[0].end_ms > 500 + LIBRI_CUT_S * 1000 + 1000  # one turn, past the pause
    assert stops[0].reason == "end_of_turn"


def test_unfinished_turn_waits_for_max_silence_and_keeps_the_probability(
    detector: SmartTurn,
) -> None:
    s = Session("s1", SessionConfig(vad=TURN_CFG, turn_detector=detector))
    libri = audio(LIBRI)
    a = np.concatenate([zeros(0.5), upto(libri, LIBRI_CUT_S), zeros(2.5)])
    _, stops, at = drive(s, a, detector)
    assert [e.reason for e in stops] == ["silence"]
    assert stops[0].eot_probability is not None and stops[0].eot_probability < 0.5
    assert at[0] - stops[0].end_ms >= 1500


def test_no_answer_ends_on_max_silence_without_probability() -> None:
    s = Session("s1", SessionConfig(vad=TURN_CFG))
    a = np.concatenate([zeros(0.5), audio(LIBRI), zeros(2.5)])
    actions, stops, at = drive(s, a, None)  # the detector gave no answer (busy, failed)
    assert any(isinstance(x, DetectTurn) for x in actions)
    assert [e.reason for e in stops] == ["silence"] and stops[0].eot_probability is None
    assert at[0] - stops[0].end_ms >= 1500


def test_an_answer_after_speech_resumed_is_stale() -> None:
    seg = Segmenter(TURN_CFG)
    libri = audio(LIBRI)
    cut = round(LIBRI_CUT_S * RATE)
    events = seg.feed(float_to_pcm16(np.concatenate([zeros(0.5), libri[:cut], zeros(0.3)])))
    checks = [e for e in events if isinstance(e, TurnCheck)]
    assert len(checks) == 1
    c = checks[0]
    rest = seg.feed(float_to_pcm16(libri[cut:]))  # speech resumed (and ended again)
    assert seg.turn_decision(c.utterance_id, c.check, 0.99, complete=True) == []
    assert seg.in_speech
    rest += seg.feed(float_to_pcm16(zeros(0.25)))
    assert not any(isinstance(e, SpeechStopped) for e in rest)
    fresh = [e for e in rest if isinstance(e, TurnCheck)]
    assert len(fresh) == 1 and fresh[0].check > c.check
    closed = seg.turn_decision(fresh[0].utterance_id, fresh[0].check, 0.9, complete=True)
    assert [(type(e), e.reason) for e in closed if isinstance(e, SpeechStopped)] == [
        (SpeechStopped, "end_of_turn")
    ]


# ------------------------------------------------------------ noise-robust barge-in


def mixed_noise() -> np.ndarray:
    """Glass breaking mixed into music: 6 s of sound that is not speech."""
    glass = audio("glass-breaking.mp3")
    music = audio("music.wav")[30 * RATE : 36 * RATE].copy()
    music[RATE : RATE + len(glass)] += glass
    return np.clip(music, -1.0, 1.0)


def start_reply(s: Session) -> list[Action]:
    actions = s.feed_audio(
        float_to_pcm16(np.concatenate([zeros(0.5), audio("ldc93s1-16k-mono.wav"), zeros(1.0)]))
    )
    assert sum(isinstance(a, SubmitTurn) for a in actions) == 1
    return actions


def test_noise_during_a_reply_does_not_cancel_it_but_speech_does() -> None:
    s = Session("s1", SessionConfig(vad=VadConfig(vad="silero")))
    start_reply(s)
    assert s.reply_id is not None
    noise = s.feed_audio(float_to_pcm16(mixed_noise()))
    assert not any(isinstance(a, CancelTurn) for a in noise)
    assert not any(isinstance(a, Send) and isinstance(a.event, SpeechStartedEvent) for a in noise)
    assert s.reply_id is not None
    speech = np.concatenate([audio("new-home-in-the-stars-16k.wav"), zeros(1.0)])
    cancel = [a for a in s.feed_audio(float_to_pcm16(speech)) if isinstance(a, CancelTurn)]
    assert [c.reason for c in cancel] == ["barge_in"]


def test_music_and_glass_never_start_a_turn_with_silero() -> None:
    s = Session("s1", SessionConfig(vad=VadConfig(vad="silero")))
    actions = s.feed_audio(
        float_to_pcm16(np.concatenate([mixed_noise(), audio("music.wav")[: 20 * RATE]]))
    )
    actions += s.end_of_stream()
    assert actions == []


# ------------------------------------------------------------ LiveSession


async def test_live_session_runs_the_detector_off_the_loop(detector: SmartTurn) -> None:
    sent: list[ServerEvent] = []
    done = asyncio.Event()

    async def send(event: ServerEvent) -> None:
        sent.append(event)
        if isinstance(event, SpeechStoppedEvent):
            done.set()

    engine = ScriptedEngine(["OK."])
    cfg = SessionConfig(vad=TURN_CFG, turn_detector=detector)
    live = LiveSession(engine, send, session_id="s1", config=cfg)
    try:
        pcm = float_to_pcm16(np.concatenate([zeros(0.5), audio(LDC), zeros(0.4)]))
        for i in range(0, len(pcm), CHUNK):
            await live.feed_audio(pcm[i : i + CHUNK])
        await asyncio.wait_for(done.wait(), timeout=120)
    finally:
        await live.close()
    stops = [e for e in sent if isinstance(e, SpeechStoppedEvent)]
    # only 400 ms of silence was fed: nothing but the model could have closed it
    assert [e.reason for e in stops] == ["end_of_turn"]
    assert stops[0].eot_probability is not None and stops[0].eot_probability >= 0.5
