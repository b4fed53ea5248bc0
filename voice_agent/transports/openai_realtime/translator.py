"""The translator (pure, sans-I/O): GA client events -> host calls and GA
events; the session's native ServerEvents -> GA server events.

    t = Translator(config_for, model=..., tag=..., can_speak=...)
    t.opening()            -> [session.created]
    t.client(text)         -> [GA event dict | Call ...]   (in order)
    t.server(event)        -> [GA event dict ...]          (a native ServerEvent)
    t.audio(pcm)           -> [response.output_audio.delta] (spoken PCM16 at t.output_rate)
    t.settled(reply_id)    -> [...]  the speaker is done with that reply

Calls the connection runs on the host, in order with the events around them:
Start (start the LiveSession, or restart it on the same conversation for
new turn-taking settings; `fresh` for a new conversation), Feed (PCM16 at
the input format's rate), Commit, Respond (a whole user turn: the pending
items), Edit (a history edit: conversation.py, history.py), Cancel,
StopAudio, Failed (report the error, send t.error(...)).

Turns: with turn_detection the input audio goes to the Session, whose VAD
cuts and answers the turns (speech.* -> input_audio_buffer.*, a user item
per utterance; idle.py for idle_timeout_ms). With create_response false a
Segmenter here (the same pure VAD, silence only) cuts them into pending
user items, and interrupt_response cancels the response in flight at speech
start. With turn_detection null the audio waits in the input buffer here
until input_audio_buffer.commit makes it a user item; items wait (pending)
until response.create sends them to the model as one turn. An out-of-band
response (conversation "none") is a turn on the same conversation with the
pending items (which stay pending), dropped from the history once it ends
(DropTurns(1)). A malformed or unsupported event gets an `error` (its
event_id) and changes nothing.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from voice_agent.audio import pcm16_to_float, resample
from voice_agent.engine.types import DropTurns, TurnInput
from voice_agent.errors import BadAudio, Busy, CommitEmpty, ResponseActive
from voice_agent.protocol import (
    ErrorEvent,
    ReplyAudioDone,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)
from voice_agent.session import SessionConfig
from voice_agent.transports.openai_realtime import aside, idle, transcripts
from voice_agent.transports.openai_realtime import events as ev
from voice_agent.transports.openai_realtime import settings as st
from voice_agent.transports.openai_realtime.calls import (
    Aside,
    Commit,
    Edit,
    Failed,
    Feed,
    Out,
    Respond,
    Start,
    StopAudio,
)
from voice_agent.transports.openai_realtime.codec import (
    FORMATS,
    b64decode,
    b64encode,
    from_pcm16,
    to_pcm16,
)
from voice_agent.transports.openai_realtime.conversation import ClientConversation
from voice_agent.transports.openai_realtime.items import Ids, Items, user_item
from voice_agent.transports.openai_realtime.responses import Options, Responses
from voice_agent.vad import Segmenter, SpeechStarted, SpeechStopped

MAX_BUFFER_MS = 30_000  # manual-turn input buffer (the model hears at most 30 s a clip)
# The user turn of a response.create with no new input and no instructions
# (a bot that speaks first, or speaks again): the model needs a user turn.
SPEAK_FIRST = "(Go on: it is your turn to speak.)"


class Translator:
    def __init__(
        self,
        config_for: Callable[[str | None], SessionConfig],
        *,
        model: str,
        tag: str,
        can_speak: bool,
        token_limit: int = 4096,
    ) -> None:
        self.config_for = config_for
        self.model = model
        self.can_speak = can_speak
        self.ids = Ids(tag)
        self.session_id = f"sess_{tag}"
        self.settings = st.initial(config_for(None))
        self._prompt_set = False  # instructions given by the client
        self.items = Items()
        self.responses = Responses(self.ids, self.items, f"conv_{tag}", token_limit)
        self.history = self.responses.history
        self.conv = ClientConversation(self.ids, self.items, self.responses, lambda: self.settings)
        self.started: Start | None = None
        self._answered = False  # a response has started: the history is not empty
        self._buffer = bytearray()  # manual turns: input audio not committed yet
        self._oob: set[str] = set()  # native reply ids of out-of-band responses
        self._asides: dict[str, Options] = {}  # asides asked for, not started yet
        self._asked: deque[ev.ResponseCreate] = deque()
        self._utterances: dict[str, str] = {}  # native utterance id -> item id
        self._open_utterance: str | None = None
        self._segmenter: Segmenter | None = None  # create_response false
        self._own_item: str | None = None  # the item of its open utterance
        self._kept = transcripts.Kept(self.input_rate)  # for transcription (Session VAD)
        self._idle = idle.IdleTimer()
        self.event_id: str | None = None  # of the client event handled last

    # -- settings -------------------------------------------------------------

    @property
    def input_rate(self) -> int:
        return FORMATS[self.settings.input_format]

    @property
    def output_rate(self) -> int:
        return FORMATS[self.settings.output_format]

    def _start(self) -> Start:
        prompt = self.settings.instructions if self._prompt_set else None
        base = self.config_for(prompt)
        return Start(st.session_config(base, self.settings), self.input_rate)

    def _session_object(self) -> dict[str, Any]:
        return st.session_object(self.settings, self.session_id, self.model)

    def opening(self) -> list[dict[str, Any]]:
        return [self.ids.event("session.created", session=self._session_object())]

    def _ensure_started(self) -> list[Out]:
        if self.started is not None:
            return []
        self.started = self._start()
        return [self.started]

    # -- client events ----------------------------------------------------------

    def client(self, text: str | bytes) -> list[Out]:
        """One client text frame -> GA events and host calls; an error event
        (with the client's event_id) for anything wrong, nothing changed."""
        try:
            request = ev.parse(text)
        except Exception as exc:
            return [Failed(exc, ev.event_id_of(text))]
        self.event_id = request.event_id  # (a call that fails reports it)
        try:
            return self._handle(request)
        except Exception as exc:
            return [Failed(exc, request.event_id)]

    def error(self, exc: BaseException, event_id: str | None = None) -> dict[str, Any]:
        return self.ids.event("error", error=ev.error_body(exc, event_id))

    def _handle(self, r: ev.Request) -> list[Out]:
        if isinstance(r, ev.SessionUpdate):
            return self._update(r)
        if isinstance(r, ev.AudioAppend):
            return self._append(r)
        if isinstance(r, ev.AudioCommit):
            return self._commit()
        if isinstance(r, ev.AudioClear):
            self._buffer.clear()
            self._segmenter = self._own_item = None
            return [self.ids.event("input_audio_buffer.cleared")]
        if isinstance(r, ev.ItemCreate):
            out = self.conv.create(r)
            edits = any(isinstance(o, Edit) for o in out)
            return [*self._ensure_started(), *out] if edits else out
        if isinstance(r, ev.ItemRetrieve):
            item = self.items.get(r.item_id)
            if item is None:
                raise self.items.missing(r.item_id)
            return [self.ids.event("conversation.item.retrieved", item=item)]
        if isinstance(r, ev.ItemDelete):
            return self.conv.delete(r)
        if isinstance(r, ev.ItemTruncate):
            return self.responses.truncate_request(r)
        if isinstance(r, ev.ResponseCreate):
            return self._respond(r)
        if isinstance(r, ev.ResponseCancel):
            return self.responses.cancel_request(r.response_id)
        # output_audio_buffer.clear: stop the audio now
        return [StopAudio(), *self.responses.cancel_held()]

    def _update(self, r: ev.SessionUpdate) -> list[Out]:
        old = self.settings
        new, refused = st.update(old, r.session)
        prompt_changed = "instructions" in r.session and new.instructions != old.instructions
        restart = self.started is not None and st.needs_restart(
            old,
            new,
            prompt_changed,
            busy=bool(self.responses.open),
            answered=self._answered or self.conv.edited,
        )
        self.settings = new
        self._prompt_set = self._prompt_set or "instructions" in r.session
        out: list[Out] = []
        if new.input_format != old.input_format:
            self._buffer.clear()
        if new.turn_detection != old.turn_detection or new.input_format != old.input_format:
            self._segmenter = self._own_item = None
        if restart:
            start = self._start()
            out.append(Start(start.config, start.sample_rate, fresh=prompt_changed))
            self.started = start
            self._open_utterance = None
        out.append(self.ids.event("session.updated", session=self._session_object()))
        return out + [Failed(exc, r.event_id) for exc in refused]

    def _append(self, r: ev.AudioAppend) -> list[Out]:
        data = b64decode(r.audio, "audio")
        pcm = to_pcm16(data, self.settings.input_format)
        if not pcm:
            return []
        if self.settings.vad:
            start = self._ensure_started()
            if start:
                self._kept = transcripts.Kept(self.input_rate)
            self._kept.keep(pcm, self.settings.transcription is not None)
            return [*start, Feed(pcm), *self._idle_check()]
        if self.settings.own_vad:
            return self._segments(self._vad().feed(pcm))
        limit = 2 * self.input_rate * MAX_BUFFER_MS // 1000
        if len(self._buffer) + len(pcm) > limit:
            raise BadAudio(
                f"the input audio buffer holds at most {MAX_BUFFER_MS // 1000} s: commit it first"
            )
        self._buffer += pcm
        return []

    def _vad(self) -> Segmenter:
        if self._segmenter is None:
            vad = self._start().config.vad
            vad = dataclasses.replace(vad, turn_check=False)
            self._segmenter = Segmenter(vad, self.input_rate, 1, pause_events=False)
        return self._segmenter

    def _segments(self, events: list[Any]) -> list[Out]:
        """create_response false: the Segmenter's events -> GA events; each
        utterance a pending user item (answered at response.create)."""
        out: list[Out] = []
        e = self.ids.event
        td = self.settings.turn_detection
        for event in events:
            if isinstance(event, SpeechStarted):
                self._own_item = self.ids.next("item")
                out.append(
                    e(
                        "input_audio_buffer.speech_started",
                        audio_start_ms=event.start_ms,
                        item_id=self._own_item,
                    )
                )
                if td is not None and td.interrupt_response:
                    out += self.responses.interrupt()
            elif isinstance(event, SpeechStopped):
                item_id = self._own_item or self.ids.next("item")
                self._own_item = None
                stopped = e(
                    "input_audio_buffer.speech_stopped", audio_end_ms=event.end_ms, item_id=item_id
                )
                item = user_item(item_id, audio=1)
                out += [stopped, *self.conv.user_item(item, None, event.audio, commit=True)]
        return out

    def _commit(self) -> list[Out]:
        if self.settings.own_vad:
            if self._own_item is None:
                raise CommitEmpty("no speech in the input audio buffer to commit", "type")
            return self._segments(self._vad().commit())
        if self.settings.vad:
            if self._open_utterance is None:
                raise CommitEmpty("no speech in the input audio buffer to commit", "type")
            return [Commit()]
        if not self._buffer:
            raise CommitEmpty("the input audio buffer is empty", "type")
        audio = resample(pcm16_to_float(bytes(self._buffer)), self.input_rate)
        self._buffer.clear()
        item = user_item(self.ids.next("item"), audio=1)
        return self.conv.user_item(item, None, audio, commit=True)

    def _respond(self, r: ev.ResponseCreate) -> list[Out]:
        """A response to the pending items (in-band: they join the history);
        out-of-band (conversation none): the same turn, which leaves the
        history when it ends (DropTurns(1) in `_server`) while the pending
        items stay pending. With `input`: an aside (aside.py)."""
        if r.input is not None:
            return self._aside(r)
        current = self.responses.in_progress
        if current is not None and not current.text_done:
            raise ResponseActive("a response is in progress: cancel it or wait", "response")
        pending = self.conv.pending
        texts = [p.text for p in pending if p.text]
        if r.instructions:  # mapped: the response's instructions join the user turn as text
            texts.append(r.instructions)
        if not texts and not any(p.audio is not None for p in pending):
            texts.append(SPEAK_FIRST)  # mapped: a reply to the conversation as it stands
        clips = [p.audio for p in pending if p.audio is not None]
        audio = np.concatenate(clips) if clips else None
        if audio is not None and len(audio) > MAX_BUFFER_MS * 16:  # (16 kHz samples)
            raise BadAudio(f"the pending audio is over {MAX_BUFFER_MS // 1000} s: delete some")
        turn = TurnInput(audio=audio, text="\n".join(texts) if texts else None)
        if r.conversation != "none":
            self.history.sent(tuple(p.item_id for p in pending))
            pending.clear()
            self.items.answered()
        else:
            self.history.out_of_band()
        self._asked.append(r)
        opts = self._options(r)
        return [*self._ensure_started(), Respond(turn, opts.audio, opts.max_output_tokens)]

    def _aside(self, r: ev.ResponseCreate) -> list[Out]:
        assert r.input is not None
        if self.responses.asides + len(self._asides) >= aside.MAX_ASIDES:
            raise Busy(f"at most {aside.MAX_ASIDES} out-of-band responses with input at once")
        live = {x.item_id: x.text for x in self.responses.open.values()}
        fmt = self.settings.input_format
        messages, turn = aside.build(r.input, self.items, fmt, SPEAK_FIRST, live)
        reply_id = self.ids.next("aside")
        opts = dataclasses.replace(self._options(r), audio=False)
        self._asides[reply_id] = opts
        system = (
            r.instructions if r.instructions is not None else self._start().config.system_prompt
        )
        return [Aside(reply_id, system, messages, turn, opts.max_output_tokens)]

    def aside_started(self, reply_id: str) -> list[dict[str, Any]]:
        """The Aside `reply_id` is about to run: its response opens."""
        return self.responses.start(reply_id, self._asides.pop(reply_id), aside=True)

    def _options(self, r: ev.ResponseCreate | None) -> Options:
        s = self.settings
        modalities = s.output_modalities
        tokens = s.max_output_tokens
        metadata = None
        if r is not None:
            modalities = r.output_modalities or modalities
            if r.max_tokens_set:
                tokens = r.max_output_tokens
            metadata = r.metadata
        audio = "audio" in modalities and self.can_speak
        in_conversation = r is None or r.conversation != "none"
        return Options(
            modalities, audio, tokens, metadata, s.output_format, s.voice, in_conversation
        )

    # -- native events -> GA ----------------------------------------------------

    def server(self, event: ServerEvent) -> Sequence[Out]:
        if isinstance(event, SpeechStartedEvent | ReplyStarted):
            self._idle.disarm()
        return self._arm(list(self._server(event)))

    def _server(self, event: ServerEvent) -> Sequence[Out]:
        e = self.ids.event
        if isinstance(event, SpeechStartedEvent):
            item_id = self.ids.next("item")
            self._utterances[event.utterance_id] = item_id
            self._open_utterance = event.utterance_id
            return [
                e(
                    "input_audio_buffer.speech_started",
                    audio_start_ms=event.start_ms,
                    item_id=item_id,
                )
            ]
        if isinstance(event, SpeechStoppedEvent):
            self._open_utterance = None
            item_id = self._utterances.pop(event.utterance_id, "") or self.ids.next("item")
            clip = None
            if self.settings.transcription is not None and self.started is not None:
                preroll = self.started.config.vad.preroll_ms
                clip = self._kept.cut(max(0, event.start_ms - preroll), event.end_ms)
            stopped = e(
                "input_audio_buffer.speech_stopped", audio_end_ms=event.end_ms, item_id=item_id
            )
            item = user_item(item_id, audio=1)
            self.history.sent((item_id,), event.utterance_id)  # the Session answers it
            return [stopped, *self.conv.user_item(item, None, clip, commit=True, pending=False)]
        if isinstance(event, ReplyStarted):
            asked = self._asked.popleft() if event.utterance_id is None and self._asked else None
            opts = self._options(asked)
            out = self.responses.start(event.reply_id, opts)
            if opts.in_conversation:
                self._answered = True
                item_id = self.responses.open[event.reply_id].item_id
                self.history.replied(item_id, event.utterance_id)
            else:
                self._oob.add(event.reply_id)
            return out
        if isinstance(event, ReplyDelta):
            return self.responses.delta(event.reply_id, event.text)
        if isinstance(event, ReplyDone):
            drop = self._drop_oob(event.reply_id)
            return [*drop, *self.responses.done(event.reply_id, event.text, event.usage)]
        if isinstance(event, ReplyCancelled):
            if event.reason == "continued":
                return self._withdrawn(event)
            drop = self._drop_oob(event.reply_id)
            return [*drop, *self.responses.cancelled(event.reply_id, event.reason, event.text)]
        if isinstance(event, ReplyAudioDone):
            return self.responses.audio_done(event.reply_id, event.cancelled)
        if isinstance(event, ErrorEvent):
            if event.reply_id is not None:
                self._oob.discard(event.reply_id)  # (a failed turn leaves no history)
                return self.responses.failed(event.reply_id, event.code, event.message)
            kind = "server_error" if event.code in ("internal", "busy") else "invalid_request_error"
            body = {"type": kind, "code": event.code, "message": event.message}
            return [e("error", error={**body, "param": None, "event_id": None})]
        return []  # session.started, reply.audio.started, command: nothing on this wire

    def _drop_oob(self, reply_id: str) -> list[Out]:
        """An out-of-band reply ended: its turn, the last one submitted, leaves
        the history (if it entered it: submitted=True; the Session submits
        nothing else while it runs)."""
        if reply_id not in self._oob:
            return []
        self._oob.discard(reply_id)
        return [Edit(DropTurns(1, submitted=True))]

    def _withdrawn(self, event: ReplyCancelled) -> list[Out]:
        """Continuation (the user went on speaking): the Session took the reply
        back and its turn left the history; the resumed utterance comes as a
        new user item. The response ends cancelled (turn_detected) if still
        open, then its item and its user items are deleted."""
        r = self.responses.by_reply(event.reply_id)
        out: list[Out] = list(self.responses.cancelled(event.reply_id, "barge_in", event.text))
        turn = self.history.forget(r.item_id) if r is not None else None
        gone = turn.items() if turn is not None else [r.item_id] if r is not None else []
        for item_id in gone:
            if item_id in self.items:
                self.items.remove(item_id, "taken back, the user went on speaking (continuation)")
                out.append(self.ids.event("conversation.item.deleted", item_id=item_id))
        return out

    def audio(self, pcm: bytes, reply_id: str | None = None) -> list[dict[str, Any]]:
        """Spoken PCM16 at output_rate -> response.output_audio.delta."""
        data = from_pcm16(pcm, self.settings.output_format)
        ms = len(pcm) / 2 / self.output_rate * 1000
        return self.responses.audio(reply_id, b64encode(data), ms)

    def settled(self, reply_id: str) -> list[dict[str, Any]]:
        """The speaker has finished with `reply_id` (its audio went out, was
        stopped, or never came)."""
        return self._arm(self.responses.audio_done(reply_id, False))

    def _arm(self, out: list[Any]) -> list[Any]:
        """A response ended and none runs: the idle timer starts."""
        done = any(isinstance(e, dict) and e["type"] == "response.done" for e in out)
        if done and not self.responses.open:
            self._idle.arm(self._kept.fed * 1000 // self.input_rate)
        return out

    def _idle_check(self) -> list[Out]:
        td = self.settings.turn_detection
        now = self._kept.fed * 1000 // self.input_rate
        start = None if td is None else self._idle.due(now, td.idle_timeout_ms)
        if start is None or self._open_utterance:
            return []
        item_id = self.ids.next("item")
        item = user_item(item_id, audio=1)
        self._asked.append(ev.ResponseCreate(None))
        self.history.sent((item_id,))
        opts = self._options(None)
        return [
            idle.triggered(self.ids, start, now, item_id),
            *self.conv.user_item(item, None, None, commit=True, pending=False),
            Respond(TurnInput(text=idle.IDLE_TEXT), opts.audio, opts.max_output_tokens),
        ]
