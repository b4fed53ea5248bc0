"""Session: one conversation's turn state machine (sans-I/O, no clocks).

The async driver feeds it microphone PCM, typed text, client commands and what
the engine reports for each reply; it returns the actions to execute, in order:

    Send(event)                              send a server event to the client
    SubmitTurn(reply_id, utterance_id, turn) submit `turn` to the engine; report
                                             its deltas/result/failure back with
                                             on_delta / on_done / on_failed
    CancelTurn(reply_id, keep_tokens, reason) cancel that engine turn, keeping
                                             `keep_tokens` reply tokens
    DetectTurn(utterance_id, check, audio)   ask the end-of-turn detector about
                                             `audio` (off the event loop) and
                                             report with on_turn_decision
    StopAudio(reply_id, reason)              stop that reply's spoken audio (its
                                             text is done; see Barge-in)

End of turn: with `vad.turn_check` (the driver has a detector, see turn.py)
the segmenter asks after `vad.min_silence_ms` of silence, and again at each
`vad.recheck_ms` point while the silence lasts; a probability at or above the
threshold of that check (`turn_threshold` at the first, then the
`turn_rechecks` schedule, see turn.threshold_at) closes the utterance at once
(speech.stopped reason "end_of_turn"), a lower one keeps it open until
`vad.max_silence_ms` of silence (reason "silence") or more speech.
speech.stopped carries the probability of the pause it closed on as
`eot_probability` (the latest check's).

A Send(ReplyStarted) always comes right before its SubmitTurn. If submitting
fails at once (errors.Busy), the driver calls on_failed for that reply id.

At most one reply runs at a time. Turns (closed utterances and typed text)
that arrive while a reply runs wait in a queue and are answered in order. The
queue holds at most `max_queued_utterances` waiting turns; when a new one
would exceed it, the OLDEST waiting turn is dropped, counted in
`dropped_utterances` and reported with an `error` event (code `busy`).

State (`state`): "thinking" while a reply runs and no delta was sent yet,
"replying" once one was; otherwise "listening" while an utterance is open
(speech.started sent, speech.stopped not yet), else "idle". The reply wins
over speech: while the user talks over a reply the state stays the reply's.

Barge-in: speech that started after the running reply was submitted and
that the VAD scored as speech for `barge_in_ms` (voiced frames only, so the
gaps of a door slam or a clatter do not add up; with vad="silero" music and
noise score no speech at all) cancels the reply: CancelTurn(keep_tokens =
tokens of the last sent delta, "barge_in") and
reply.cancelled with the text sent so far. `barge_in_ms <= 0` turns barge-in
off. Speech that was already going on when a reply was submitted never
cancels it, nor does the continuation of an utterance split at max length.

Barge-in while the assistant is heard: the driver reports the reply's audio
with playback(reply_id, True) when reply.audio.started goes out and
playback(reply_id, False) when the audio has finished playing (or stopped).
In between, speech must last `barge_in_speaking_ms` (default 500, never less
than barge_in_ms) to barge in, so echo of the assistant's own voice that the
client's echo cancellation missed does not cut it off. Playback may outlast
the reply's text: speech that long after reply.done, while the audio still
plays, returns StopAudio(reply_id, "barge_in") (no reply.cancelled: the
text reply has finished and stays whole in the history); it counts in
`barge_ins`, and the interrupting utterance is answered when it closes.
Playback reports for a reply that is no longer the newest, or that was
cancelled or stopped, are ignored; a new reply, a cancel or StopAudio end
playback for the Session at once.
Turns that were waiting behind the barged-in reply stay queued in order, and
nothing new is submitted until the interrupting utterance has closed; it then
joins the queue behind them. A client `cancel` works the same way (reason
"client") but submits the next waiting turn at once.

Commands: with a `devices` allowlist in the config, on_done follows the
reply.done of a finished (not cancelled) reply with one `command` event per
valid command in its text (commands.parse_commands); invalid ones are only
counted in `rejected_commands`, by reason.

History: a turn enters `history` when it ends (done or cancelled), as a user
entry followed by an assistant entry; a cancelled reply keeps only the text
that was sent. Failed and dropped turns never enter it (the engine drops a
failed turn from its history as well).
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from voice_agent.audio import duration_ms
from voice_agent.commands import DeviceList, parse_commands
from voice_agent.engine.types import AudioArray, Delta, TurnInput, TurnResult
from voice_agent.errors import BadAudio, BadMessage, Busy
from voice_agent.protocol import (
    CommandEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    error_event,
    reply_wire_id,
    utterance_wire_id,
)
from voice_agent.turn_schedule import threshold_at
from voice_agent.vad import (
    Segmenter,
    SegmenterEvent,
    SpeechPaused,
    SpeechStarted,
    TurnCheck,
    VadConfig,
)

State = Literal["idle", "listening", "thinking", "replying"]

# segmenter reason -> wire reason (the protocol has no "end_of_stream")
_WIRE_REASON = {"end_of_stream": "silence"}


@dataclass(frozen=True)
class SessionConfig:
    vad: VadConfig = field(default_factory=VadConfig)
    barge_in_ms: int = 300  # speech this long cancels the running reply; <= 0: never
    # ... while the reply's audio plays: speech this long (at least barge_in_ms)
    barge_in_speaking_ms: int = 500
    max_queued_utterances: int = 4  # waiting turns; beyond it the oldest is dropped
    max_text_chars: int = 4000  # longer `text` -> BadMessage
    system_prompt: str | None = None  # for the driver, when it opens the engine Conversation
    devices: DeviceList | None = None  # command allowlist; None: replies carry no commands
    speculative_prefill: bool = True  # Speculate actions while the hangover runs
    turn_threshold: float = 0.97  # end-of-turn probability that closes the utterance
    # thresholds of the later checks: (silence_ms, threshold) at vad.recheck_ms
    turn_rechecks: tuple[tuple[int, float], ...] = ()
    # The end-of-turn detector (turn.TurnDetector) the driver runs for DetectTurn;
    # the Session never calls it. vad.turn_check says whether checks are made.
    turn_detector: Any = None


@dataclass(frozen=True)
class Send:
    event: ServerEvent


@dataclass(frozen=True)
class SubmitTurn:
    reply_id: str
    utterance_id: str | None
    turn: TurnInput


@dataclass(frozen=True)
class CancelTurn:
    reply_id: str
    keep_tokens: int
    reason: str  # "barge_in" | "client"


@dataclass(frozen=True)
class Speculate:
    """Prefill this audio as the next turn ahead of time (the VAD hangover is
    running and the engine would start this turn at once). The engine uses it
    only if the turn's audio turns out to be exactly these samples."""

    audio: AudioArray


@dataclass(frozen=True)
class DetectTurn:
    """Run the end-of-turn detector on `audio` (the utterance so far, at most
    8 s, silence included) and call on_turn_decision(utterance_id, check, p,
    silence_ms)."""

    utterance_id: int
    check: int
    audio: AudioArray
    silence_ms: int = 0  # silence at the end of `audio` (which threshold applies)


@dataclass(frozen=True)
class StopAudio:
    """Stop the spoken audio of `reply_id`, whose text is already done."""

    reply_id: str
    reason: str  # "barge_in"


Action = Send | SubmitTurn | CancelTurn | Speculate | DetectTurn | StopAudio


@dataclass(frozen=True)
class HistoryEntry:
    role: Literal["user", "assistant"]
    text: str | None  # typed text or reply text; None for a spoken user turn
    audio_ms: int | None  # duration of the user's clip; None for text
    utterance_id: str | None
    reply_id: str | None
    cancelled: bool = False


@dataclass(frozen=True)
class _Turn:
    utterance_id: str | None
    turn: TurnInput
    audio_ms: int | None


@dataclass
class _Reply:
    reply_id: str
    user: _Turn
    last_started: int  # newest segmenter utterance id started before submission
    text: str = ""  # text sent in deltas so far
    tokens: int = 0  # Delta.tokens of the last sent delta
    streaming: bool = False


class Session:
    """One conversation's turns, barge-in and history (see module doc)."""

    def __init__(
        self,
        session_id: str,
        config: SessionConfig = SessionConfig(),
        sample_rate: int = 16000,
        channels: int = 1,
        *,
        ids_from: tuple[int, int] = (0, 0),
    ) -> None:
        """`ids_from` = (utterances, replies) already numbered in this
        conversation: a resumed session continues at u<n+1> and r<m+1>."""
        self.session_id = session_id
        self.config = config
        self._seg = Segmenter(
            config.vad, sample_rate, channels, pause_events=config.speculative_prefill
        )  # vad="silero" loads the shared Silero model on first use
        self._reply: _Reply | None = None
        self._queue: deque[_Turn] = deque()
        self._utterance_base = ids_from[0]
        self._next_reply = ids_from[1] + 1
        self._open: int | None = None  # segmenter id of the open (started) utterance
        self._last_started = 0
        self._continuation: int | None = None  # open utterance continuing a max-length split
        self._split_at_ms: int | None = None
        self._hold: int | None = None  # interrupting utterance: submit nothing until it closes
        # (reply_id, last_started) of the newest reply while its audio may still play
        self._audio: tuple[str, int] | None = None
        self._playing = False  # that audio is playing (playback reports)
        self._ended = False
        self.history: list[HistoryEntry] = []
        self.dropped_utterances = 0
        self.barge_ins = 0
        self.rejected_commands: dict[str, int] = {}  # reason -> count (never sent)

    # -- read-only views --------------------------------------------------

    @property
    def state(self) -> State:
        r = self._reply
        if r is not None:
            return "replying" if r.streaming else "thinking"
        return "listening" if self._open is not None else "idle"

    @property
    def ids_used(self) -> tuple[int, int]:
        """(utterances, replies) numbered so far, for `ids_from` on resume."""
        return self._utterance_base + self._last_started, self._next_reply - 1

    @property
    def reply_id(self) -> str | None:
        """The reply running now, if any."""
        return None if self._reply is None else self._reply.reply_id

    @property
    def queued(self) -> int:
        """Turns waiting for the running reply to end."""
        return len(self._queue)

    @property
    def playing(self) -> str | None:
        """The reply whose spoken audio is playing now, if any."""
        return self._audio[0] if self._audio is not None and self._playing else None

    @property
    def dropped_noise(self) -> int:
        """Bursts the segmenter dropped as shorter than min_speech_ms."""
        return self._seg.dropped

    @property
    def position_ms(self) -> int:
        """Audio consumed so far (from the sample count)."""
        return self._seg.position_ms

    # -- input ------------------------------------------------------------

    def feed_audio(self, pcm: bytes) -> list[Action]:
        """Microphone PCM16 at the session's rate; BadAudio leaves the session usable."""
        if self._ended:
            raise BadAudio("the audio stream has ended")
        return self._segments(self._seg.feed(pcm))

    def text(self, text: str) -> list[Action]:
        """A typed user turn (queued like an utterance while a reply runs)."""
        if len(text) > self.config.max_text_chars:
            raise BadMessage(f"text is longer than {self.config.max_text_chars} characters")
        if not text.strip():
            raise BadMessage("text is empty")
        return self._enqueue(_Turn(None, TurnInput(text=text), None))

    def commit(self) -> list[Action]:
        """audio.commit: close the utterance in progress now ([] when none)."""
        return [] if self._ended else self._segments(self._seg.commit())

    def cancel(self) -> list[Action]:
        """Client cancel of the running reply ([] when none)."""
        return [] if self._reply is None else self._cancel("client")

    def on_turn_decision(
        self, utterance_id: int, check: int, probability: float | None, silence_ms: int = 0
    ) -> list[Action]:
        """The detector's answer to DetectTurn (None: no answer; the utterance
        then ends on max_silence_ms). Stale answers are ignored. `silence_ms`:
        the DetectTurn's, which picks the threshold (0: the first check's)."""
        if self._ended or probability is None:
            return []
        cfg = self.config
        complete = probability >= threshold_at(silence_ms, cfg.turn_threshold, cfg.turn_rechecks)
        return self._segments(self._seg.turn_decision(utterance_id, check, probability, complete))

    def playback(self, reply_id: str, playing: bool) -> list[Action]:
        """The reply's audio started (True) or finished (False) playing; see
        the module doc. Stale reports are ignored."""
        if self._audio is not None and self._audio[0] == reply_id:
            self._playing = playing
            if not playing:
                self._audio = None
        return []

    def end_of_stream(self) -> list[Action]:
        """No more audio: close any open utterance (it is still answered)."""
        if self._ended:
            return []
        self._ended = True
        return self._segments(self._seg.flush())

    # -- engine reports ---------------------------------------------------

    def on_delta(self, reply_id: str, delta: Delta) -> list[Action]:
        """A decoded piece; ignored unless `reply_id` runs now. An empty piece is
        not sent and does not count towards keep_tokens."""
        r = self._current(reply_id)
        if r is None or not delta.text:
            return []
        r.text += delta.text
        r.tokens = delta.tokens
        r.streaming = True
        return [Send(ReplyDelta(reply_id, delta.text))]

    def on_done(self, reply_id: str, result: TurnResult) -> list[Action]:
        r = self._current(reply_id)
        if r is None:
            return []
        self._reply = None
        timing = {k: round(v, 1) for k, v in asdict(result.timing).items()}
        actions: list[Action] = [
            Send(ReplyDone(reply_id, result.text, asdict(result.usage), timing))
        ]
        devices = self.config.devices
        if devices is not None and not result.cancelled:
            parsed = parse_commands(result.text, devices)
            for c in parsed.commands:
                actions.append(Send(CommandEvent(c.action, c.target, c.value)))
            for rej in parsed.rejected:
                self.rejected_commands[rej.reason] = self.rejected_commands.get(rej.reason, 0) + 1
        self._record(r, result.text, result.cancelled)
        return actions + self._pump()

    def on_failed(self, reply_id: str, exc: BaseException) -> list[Action]:
        if self._current(reply_id) is None:
            return []
        self._reply = None
        actions: list[Action] = [Send(error_event(exc, reply_id))]
        return actions + self._pump()

    # -- internals --------------------------------------------------------

    def _current(self, reply_id: str) -> _Reply | None:
        r = self._reply
        return r if r is not None and r.reply_id == reply_id else None

    def _segments(self, events: list[SegmenterEvent]) -> list[Action]:
        actions: list[Action] = []
        for ev in events:
            uid = utterance_wire_id(self._utterance_base + ev.utterance_id)
            if isinstance(ev, SpeechPaused):
                idle = self._reply is None and self._hold is None and not self._queue
                if idle and self.config.speculative_prefill:
                    actions.append(Speculate(ev.audio))
                continue
            if isinstance(ev, TurnCheck):
                actions.append(DetectTurn(ev.utterance_id, ev.check, ev.audio, ev.silence_ms))
                continue
            if isinstance(ev, SpeechStarted):
                self._open = self._last_started = ev.utterance_id
                is_cont = self._split_at_ms is not None and ev.start_ms == self._split_at_ms
                self._continuation = ev.utterance_id if is_cont else None
                self._split_at_ms = None
                actions.append(Send(SpeechStartedEvent(uid, ev.start_ms)))
                continue
            self._open = None
            self._split_at_ms = ev.end_ms if ev.reason == "max_length" else None
            reason = _WIRE_REASON.get(ev.reason, ev.reason)
            eot = None if ev.eot_probability is None else round(ev.eot_probability, 3)
            actions.append(Send(SpeechStoppedEvent(uid, ev.start_ms, ev.end_ms, reason, eot)))
            # A whole utterance that went by within one chunk may still barge in.
            actions += self._barge_in(ev.utterance_id, ev.voiced_ms)
            self._continuation = None
            if self._hold == ev.utterance_id:
                self._hold = None
            turn = _Turn(uid, TurnInput(audio=ev.audio), duration_ms(ev.audio))
            actions += self._enqueue(turn)
        if self._open is not None:
            actions += self._barge_in(self._open, self._seg.voiced_ms)
        return actions

    def _barge_in(self, utterance: int, voiced_ms: int) -> list[Action]:
        """Cancel the running reply, or stop the audio of a finished one still
        playing, when this utterance has barged in (see the module doc)."""
        r = self._reply
        if r is not None:
            if self._may_barge(utterance, voiced_ms, r.last_started):
                return self._cancel("barge_in", hold=utterance)
            return []
        audio = self._audio
        if audio is None or not self._playing:
            return []
        if not self._may_barge(utterance, voiced_ms, audio[1]):
            return []
        self._audio = None
        self._playing = False
        self.barge_ins += 1
        return [StopAudio(audio[0], "barge_in")]

    def _may_barge(self, utterance: int, voiced_ms: int, last_started: int) -> bool:
        limit = self.config.barge_in_ms
        if self._playing:  # the assistant is heard: echo must not cut it off
            limit = max(limit, self.config.barge_in_speaking_ms)
        return (
            self.config.barge_in_ms > 0
            and voiced_ms >= limit
            and utterance > last_started
            and utterance != self._continuation
        )

    def _cancel(self, reason: str, hold: int | None = None) -> list[Action]:
        r = self._reply
        assert r is not None
        self._reply = None
        if self._audio is not None and self._audio[0] == r.reply_id:
            self._audio = None  # reply.cancelled stops its audio
            self._playing = False
        if reason == "barge_in":
            self.barge_ins += 1
            self._hold = hold
        self._record(r, r.text, True)
        actions: list[Action] = [
            CancelTurn(r.reply_id, r.tokens, reason),
            Send(ReplyCancelled(r.reply_id, reason, r.text)),
        ]
        return actions + self._pump()

    def _record(self, r: _Reply, text: str, cancelled: bool) -> None:
        u = r.user
        self.history.append(
            HistoryEntry("user", u.turn.text, u.audio_ms, u.utterance_id, r.reply_id)
        )
        self.history.append(
            HistoryEntry("assistant", text, None, u.utterance_id, r.reply_id, cancelled)
        )

    def _enqueue(self, turn: _Turn) -> list[Action]:
        self._queue.append(turn)
        actions = self._pump()
        while len(self._queue) > max(0, self.config.max_queued_utterances):
            old = self._queue.popleft()
            self.dropped_utterances += 1
            what = "text turn" if old.utterance_id is None else f"utterance {old.utterance_id}"
            actions.append(Send(error_event(Busy(f"{what} dropped: too many turns waiting"))))
        return actions

    def _pump(self) -> list[Action]:
        """Submit the next waiting turn when nothing runs and nothing holds it."""
        if self._reply is not None or self._hold is not None or not self._queue:
            return []
        t = self._queue.popleft()
        reply_id = reply_wire_id(self._next_reply)
        self._next_reply += 1
        self._reply = _Reply(reply_id, t, self._last_started)
        self._audio = (reply_id, self._last_started)  # a new reply stops the old one's audio
        self._playing = False
        return [
            Send(ReplyStarted(reply_id, t.utterance_id)),
            SubmitTurn(reply_id, t.utterance_id, t.turn),
        ]
