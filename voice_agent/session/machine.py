"""The Session state machine: turns, the reply queue, barge-in and history
(see the package doc for the rules; pure, no clocks)."""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass
from typing import Literal

from voice_agent.audio import duration_ms
from voice_agent.commands import parse_commands
from voice_agent.engine.types import Delta, DropTurns, TurnInput, TurnResult
from voice_agent.errors import BadAudio, BadMessage, Busy
from voice_agent.protocol import (
    CommandEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    error_event,
    reply_wire_id,
    utterance_wire_id,
)
from voice_agent.session.actions import (
    Action,
    CancelTurn,
    DetectTurn,
    EditHistory,
    HistoryEntry,
    Send,
    Speculate,
    StopAudio,
    SubmitTurn,
)
from voice_agent.session.config import SessionConfig
from voice_agent.session.continuation import (
    KEEP_SLACK_MS,
    SHORT_WORD_SURE_MS,
    Candidate,
    Turn,
    candidate,
    closed_turns,
    keep_ms,
    resumed,
)
from voice_agent.turn_schedule import threshold_at
from voice_agent.vad import (
    Segmenter,
    SegmenterEvent,
    SpeechPaused,
    SpeechStarted,
    TurnCheck,
)

State = Literal["idle", "listening", "thinking", "replying"]

# segmenter reason -> wire reason (the protocol has no "end_of_stream")
_WIRE_REASON = {"end_of_stream": "silence"}

DEFAULT_SESSION_CONFIG = SessionConfig()  # frozen: one shared default
_TURN_WINDOW = 8 * 16000  # samples a DetectTurn carries at most (the detector's 8 s)


_Turn = Turn


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
        config: SessionConfig = DEFAULT_SESSION_CONFIG,
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
            config.vad,
            sample_rate,
            channels,
            pause_events=config.speculative_prefill,
            keep_ms=keep_ms(config),
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
        self._cand: Candidate | None = None  # continuation: see continuation.py
        self._joining: Candidate | None = None
        self.history: list[HistoryEntry] = []
        self.dropped_utterances = 0
        self.barge_ins = 0
        self.continuations = 0  # replies taken back (or queued turns joined) by continuation
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
        self._cand = None  # a typed turn is never joined, nor spoken over
        return self._enqueue(_Turn(None, TurnInput(text=text), None))

    def turn(self, turn: TurnInput) -> list[Action]:
        """A whole user turn given at once, no VAD (a request/reply transport:
        MQTT's clip, with or without an instruction, or text): queued like
        typed text. BadMessage without audio or text, or with too long a text."""
        text = turn.text
        if text is not None and len(text) > self.config.max_text_chars:
            raise BadMessage(f"text is longer than {self.config.max_text_chars} characters")
        if turn.audio is None and not (text and text.strip()):
            raise BadMessage("a turn needs audio or text")
        audio_ms = duration_ms(turn.audio) if turn.audio is not None else None
        self._cand = None
        return self._enqueue(_Turn(None, turn, audio_ms))

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
        c = self._cand
        if c is not None and c.reply_id == reply_id:
            if playing and c.play_from is None:
                c.play_from = self.position_ms
            elif not playing and c.play_from is not None and c.play_until is None:
                c.play_until = self.position_ms
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
            if parsed.commands and self._cand is not None and self._cand.reply_id == reply_id:
                self._cand = None  # it acted on devices: never taken back
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
        if self._cand is not None and self._cand.reply_id == reply_id:
            self._cand = None  # not in the engine's history: nothing to take back
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
            joining = self._joining
            if joining is not None and joining.resumed_by != ev.utterance_id:
                joining = None
            if isinstance(ev, SpeechPaused):
                hold = self._hold is None or (joining is not None and self._hold == ev.utterance_id)
                idle = self._reply is None and hold and not self._queue
                if idle and self.config.speculative_prefill:
                    actions.append(
                        Speculate(ev.audio if joining is None else joining.join(ev.audio))
                    )
                continue
            if isinstance(ev, TurnCheck):
                audio = ev.audio
                if joining is not None and len(audio) < _TURN_WINDOW:
                    audio = joining.join(audio)[-_TURN_WINDOW:]
                actions.append(DetectTurn(ev.utterance_id, ev.check, audio, ev.silence_ms))
                continue
            if isinstance(ev, SpeechStarted):
                self._open = self._last_started = ev.utterance_id
                is_cont = self._split_at_ms is not None and ev.start_ms == self._split_at_ms
                self._continuation = ev.utterance_id if is_cont else None
                self._split_at_ms = None
                actions.append(Send(SpeechStartedEvent(uid, ev.start_ms)))
                # does it resume the last utterance in time?
                self._cand = resumed(self._cand, ev, self._seg.audio_span, self.config)
                continue
            self._open = None
            self._split_at_ms = ev.end_ms if ev.reason == "max_length" else None
            reason = _WIRE_REASON.get(ev.reason, ev.reason)
            eot = None if ev.eot_probability is None else round(ev.eot_probability, 3)
            # A whole utterance that went by within one chunk may still continue
            # the last one, or barge in.
            withdrawn = self._continue(ev.utterance_id, ev.voiced_ms, closed=True)
            turns, continues, audio_start = closed_turns(self._joining, ev, uid, self.config)
            if self._joining is not None and self._joining.resumed_by == ev.utterance_id:
                self._joining = None
            stopped = SpeechStoppedEvent(uid, ev.start_ms, ev.end_ms, reason, eot, continues)
            actions += [Send(stopped), *withdrawn]
            actions += self._barge_in(ev.utterance_id, ev.voiced_ms)
            self._continuation = None
            if self._hold == ev.utterance_id:
                self._hold = None
            self._cand = candidate(turns[-1], ev, audio_start, self.config)
            for turn in turns:
                actions += self._enqueue(turn)
        if self._open is not None:
            actions += self._continue(self._open, self._seg.voiced_ms)
            actions += self._barge_in(self._open, self._seg.voiced_ms)
        c = self._cand
        if c is not None and c.resumed_by is None:
            late = self.config.continue_window_ms + KEEP_SLACK_MS  # SpeechStarted comes late
            if self._seg.frames_ms - c.closed_ms > late:
                self._cand = None  # the window has passed: let its audio go
        return actions

    # -- continuation (continuation.py) ----------------------------------

    def _continue(self, utterance: int, voiced_ms: int, closed: bool = False) -> list[Action]:
        """The resuming utterance has been speech long enough (voiced for
        barge_in_ms, as for a barge-in), or has closed sooner (a short last
        word); with Silero, only if it is sure of SHORT_WORD_SURE_MS of it:
        take the candidate's reply back; the utterance is joined to it when it
        closes."""
        c = self._cand
        if c is None or c.resumed_by != utterance:
            return []
        sure: int | None = None  # speech Silero is sure of (None: no Silero)
        if c.check is not None:
            sure = c.confirmed_ms(self._seg.audio_span, self._seg.frames_ms)
        elif self.config.vad.vad == "silero":
            sure = voiced_ms  # the Segmenter counts only sure frames
        limit = self.config.barge_in_ms
        if self._playing and self._audio is not None and self._audio[0] == c.reply_id:
            limit = max(limit, self.config.barge_in_speaking_ms)
        # The VAD's voiced frames say how long (as for a barge-in); Silero, when
        # there, says whether it is speech at all (music, clatter: no frame).
        if sure is not None and sure < SHORT_WORD_SURE_MS:
            return []
        if voiced_ms < limit and not (closed and sure is not None):
            return []  # (a short last word that closed: Silero's word is enough)
        self._cand = None
        self._joining = c
        self._hold = utterance
        self.continuations += 1
        if self._queue and self._queue[-1] is c.turn:
            self._queue.pop()  # not submitted yet: just joined
            return []
        reply_id = c.reply_id
        if reply_id is None:  # dropped from a full queue: nothing to take back
            return []
        if self._audio is not None and self._audio[0] == reply_id:
            self._audio = None
            self._playing = False
        actions: list[Action] = [StopAudio(reply_id, "continued")]
        r = self._reply
        if r is not None and r.reply_id == reply_id:
            self._reply = None
            text = r.text
            actions.append(CancelTurn(reply_id, 0, "continued"))
        else:  # finished: it leaves our history too
            text = next(
                (
                    e.text or ""
                    for e in self.history
                    if e.reply_id == reply_id and e.role == "assistant"
                ),
                "",
            )
            self.history = [e for e in self.history if e.reply_id != reply_id]
        return [
            *actions,
            Send(ReplyCancelled(reply_id, "continued", text)),
            EditHistory(DropTurns(1, submitted=True)),
        ]

    def _barge_in(self, utterance: int, voiced_ms: int) -> list[Action]:
        """Cancel the running reply, or stop the audio of a finished one still
        playing, when this utterance has barged in (see the module doc)."""
        c = self._cand
        if c is not None and c.resumed_by == utterance:
            return []  # it may continue the last utterance: _continue decides
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
        if self._cand is not None and self._cand.reply_id == r.reply_id:
            self._cand = None
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
        if self._cand is not None and self._cand.turn is t:
            self._cand.reply_id = reply_id
        self._audio = (reply_id, self._last_started)  # a new reply stops the old one's audio
        self._playing = False
        return [
            Send(ReplyStarted(reply_id, t.utterance_id)),
            SubmitTurn(reply_id, t.utterance_id, t.turn),
        ]
