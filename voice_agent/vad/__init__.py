"""Segmenter: PCM chunks in, speech events out (pure; no clocks, no I/O).

Audio of any supported rate/channels is resampled to 16 kHz mono and cut into
20 ms frames. A frame counts as speech when webrtcvad says so AND it is loud
enough: at least `_FLOOR_MARGIN_DB` above a tracked noise floor, and, inside
an utterance, no more than `_PEAK_RANGE_DB` below the utterance's loudest
frame (so crowd noise or a fan after the last word does not stretch the end).

    onset     2 of the last 3 frames are speech; start = first of them
    started   speech has lasted min_speech_ms -> SpeechStarted(start_ms)
    dropped   hangover elapses before that -> no events, `dropped` += 1
    stopped   hangover_ms without speech -> SpeechStopped(end = end of last
              speech frame); also on max length, commit, flush

With `turn_check` (an end-of-turn detector is present, see turn.py) the
hangover is replaced by two steps:

    check     min_silence_ms without speech -> TurnCheck(audio so far,
              silence included); the driver answers with turn_decision():
              complete closes the utterance at once ("end_of_turn"); again at
              each recheck_ms point while the silence lasts (the schedule
              that decides is the driver's, see turn.threshold_at)
    stopped   max_silence_ms without speech and no complete decision ->
              SpeechStopped("silence"); more speech first makes the check stale

Which frames are speech comes from a FrameScorer: webrtcvad (default, every
frame at once) or Silero VAD (`vad="silero"`, a small ONNX network on 32 ms
windows, much better at telling music, clatter and crowd noise from speech;
its decisions lag the audio by up to one window). Both share the loudness
gates below, and the Segmenter is the same for both.

All positions are 16 kHz frame counts: soxr's stream output is aligned with
the input (its filter delay is trimmed), so frame k starts at k * 20 ms of the
input stream whatever its rate; only the moment events are emitted lags.

    events.py     VadConfig and the events (SpeechStarted, SpeechPaused,
                  TurnCheck, SpeechStopped)
    scoring.py    the frame scorers (webrtcvad, Silero)
    segmenter.py  the Segmenter
    frames.py     20 ms frame sizes, PCM16 <-> float
"""

from voice_agent.vad.events import (
    VAD_KINDS,
    SegmenterEvent,
    SpeechPaused,
    SpeechStarted,
    SpeechStopped,
    TurnCheck,
    VadConfig,
)
from voice_agent.vad.scoring import (
    FrameScorer,
    SileroModel,
    SileroScorer,
    WebrtcScorer,
    make_scorer,
    package_data_path,
    silero_model,
)
from voice_agent.vad.segmenter import Segmenter

__all__ = [
    "VAD_KINDS",
    "FrameScorer",
    "Segmenter",
    "SegmenterEvent",
    "SileroModel",
    "SileroScorer",
    "SpeechPaused",
    "SpeechStarted",
    "SpeechStopped",
    "TurnCheck",
    "VadConfig",
    "WebrtcScorer",
    "make_scorer",
    "package_data_path",
    "silero_model",
]
