"""Defaults of the turn-taking settings, defined once (pure: constants only).

Config's fields (`--hangover-ms`, `--barge-in-ms`, ...) and the core's own
settings (vad.VadConfig, session.SessionConfig, for a Segmenter or Session
built without a Config: tests, benchmarks, the client) take their defaults
from here. The core does not import config.py (argparse, the environment);
config.py imports this module. tests/test_defaults.py checks they agree.
"""

from __future__ import annotations

# voice activity detection (vad.VadConfig)
VAD = "webrtc"  # frame scorer: "webrtc" or "silero"
VAD_AGGRESSIVENESS = 2  # webrtcvad 0..3
PREROLL_MS = 300  # audio before the onset kept in the utterance
# silence that ends an utterance (no end-of-turn model). The defaults of the
# hangover and of continuation are benchmarks/turns.py's pick (issue 20): at most
# 1 % of cut sentences answered as fragments, then the fastest reply
HANGOVER_MS = 300
MIN_SPEECH_MS = 200  # shorter bursts are dropped as noise
MAX_UTTERANCE_MS = 30000  # the encoder sees 30 s; longer speech is split and continued
MIN_SILENCE_MS = 200  # with the end-of-turn model: silence before it is asked
MAX_SILENCE_MS = 1500  # with the model: silence that closes a turn it judged unfinished

# the session (session.SessionConfig)
BARGE_IN_MS = 300  # speech this long cancels the running reply
BARGE_IN_SPEAKING_MS = 500  # ... while the reply's audio plays (echo must not cut it off)
# continuation: speech resumed this soon after an utterance closed (and before
# its reply was heard for CONTINUE_HEARD_MS) withdraws the reply and joins the two
CONTINUE_WINDOW_MS = 3000  # 0: continuation off
CONTINUE_HEARD_MS = 1500
MAX_QUEUED_UTTERANCES = 4  # turns waiting behind a running reply
MAX_TEXT_CHARS = 4000  # longest typed text turn
# end-of-turn probability that closes the turn at the first check (the
# fewest-cut-offs setting of benchmarks/turn_segments.py; the model is off by
# default: with continuation it does no better than the hangover, turns.py)
TURN_THRESHOLD = 0.97
