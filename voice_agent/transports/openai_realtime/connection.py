"""One OpenAI Realtime WebSocket on the conversation host: the glue.

The translator (translator.py, pure) does the protocol; this class only
pumps: each client text frame goes through `Translator.client`, whose GA
events are queued to the outbox and whose calls run on the host in order
(Start -> host.start_session with the translator's SessionConfig, or
host.end_session + start_session on the same conversation for new
turn-taking settings; Feed/Commit/Respond/Cancel -> the LiveSession;
StopAudio -> the speaker; Edit -> engine.edit_history on the session's
conversation, not waited for; Failed -> host.report and an `error`). Every
native event of the session goes through the speaker (host.speaker, at the
output format's rate) and `Translator.server`; spoken PCM through
`Translator.audio`. A reply's response.done waits for its audio: after
reply.done, a small watch waits until the speaker is done with the reply
(reply.audio.done, or no audio at all) and then calls `Translator.settled`.

Limits, as on the native protocol: messages beyond `max_messages_per_second`
and audio beyond `max_audio_speed` times real time (after a 10 s allowance)
make the reader wait (limits.py); no client message for `idle_timeout`
seconds while no reply runs closes with 1000 (errors.IdleTimeout); the
outbox is bounded (send_queue) and a client that stops reading is closed with
1008 (errors.SlowClient). Binary frames are not part of this protocol: `error`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from voice_agent.engine.base import TurnHandle
from voice_agent.engine.types import SAMPLE_RATE, TurnInput
from voice_agent.errors import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    BadMessage,
    Busy,
    IdleTimeout,
    SlowClient,
    Unsupported,
    WireError,
)
from voice_agent.host import ConversationHost
from voice_agent.limits import AudioPacer, MessageLimiter
from voice_agent.live import LiveSession
from voice_agent.protocol import ReplyAudioStarted, ReplyDone, ReplyStarted, ServerEvent
from voice_agent.transports.openai_realtime import transcripts
from voice_agent.transports.openai_realtime.aside_run import run_aside
from voice_agent.transports.openai_realtime.calls import (
    Aside,
    Cancel,
    CancelAside,
    Commit,
    Edit,
    Failed,
    Feed,
    Out,
    Respond,
    Start,
    StopAudio,
    Transcribe,
)
from voice_agent.transports.openai_realtime.route import requested_model
from voice_agent.transports.openai_realtime.translator import Translator
from voice_agent.transports.sansio import Connection
from voice_agent.transports.websocket.outbox import Outbox, close_or_abort
from voice_agent.tts.speaker import ReplySpeaker

if TYPE_CHECKING:
    from voice_agent.config import Config

logger = logging.getLogger("voice_agent.transports.openai_realtime")

TRANSPORT = "openai"  # the label this transport's errors are counted under
SETTLE_POLL_S = 0.02  # how often the response.done watch looks at the speaker
MAX_TRANSCRIPTS = 4  # transcriptions waiting; beyond, an item's transcription fails (busy)


def _dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False)


class RealtimeConnection:
    """One OpenAI Realtime connection; see the module doc."""

    def __init__(
        self, host: ConversationHost, config: Config, ws: Connection, *, owner: str = ""
    ) -> None:
        self.host = host
        self.config = config
        self.ws = ws
        self.owner = owner
        self.outbox = Outbox(ws, config.send_queue)
        self.t = Translator(
            host.config_for,
            model=requested_model(ws) or host.engine.model_name,
            tag=secrets.token_hex(4),
            can_speak=host.speech is not None,
            token_limit=config.max_new_tokens or 4096,
        )
        self.live: LiveSession | None = None
        self.speaker: ReplySpeaker | None = None
        self._audio_reply: str | None = None  # the reply whose audio is being sent
        self._closing = False
        self._tasks: set[asyncio.Future[Any]] = set()  # cancelled at the end
        self._closes: set[asyncio.Future[Any]] = set()  # awaited at the end
        self._audio_out: bool | None = None  # the output modality applied to the speaker
        self._transcripts: asyncio.Queue[Transcribe] = asyncio.Queue(MAX_TRANSCRIPTS)
        self._messages = MessageLimiter(config.max_messages_per_second, time.monotonic)
        self._pacer = AudioPacer(config.max_audio_speed, time.monotonic)
        self._last_seen = 0.0  # loop time of the last client message
        self._transcriber: asyncio.Future[Any] | None = None
        self._aside_handles: dict[str, TurnHandle] = {}  # out-of-band responses with input

    @property
    def session_id(self) -> str:
        return self.live.session_id if self.live is not None else ""

    @property
    def queued(self) -> int:
        """Events waiting to be written (the send queue)."""
        return self.outbox.queued

    @property
    def fast_frames(self) -> int:
        """Always 0: audio comes as JSON here, the binary fast path is not used."""
        return 0

    async def flush(self, timeout: float) -> None:
        await self.outbox.flush(timeout)

    # -- out ---------------------------------------------------------------------

    def _put(self, events: Sequence[Out]) -> None:
        for event in events:
            if self._closing:
                return
            if isinstance(event, Transcribe):
                self._transcribe(event)
                continue
            if isinstance(event, Edit):
                self._edit(event)
                continue
            if not isinstance(event, dict):  # (the translator's server side makes no other call)
                continue
            if not self.outbox.put(_dumps(event)):
                self._too_slow()
                return

    def _report(self, exc: BaseException) -> WireError:
        return self.host.report(exc, transport=TRANSPORT, session_id=self.session_id)

    def _too_slow(self) -> None:
        self._closing = True
        wire = self.host.report(SlowClient(), transport=TRANSPORT, session_id=self.session_id)
        self.outbox.stop_writing()
        closing = asyncio.ensure_future(
            close_or_abort(self.ws, wire.close_code or CLOSE_POLICY, wire.message)
        )
        self._closes.add(closing)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send(self, event: ServerEvent) -> None:
        """The session's native events (LiveSession's send)."""
        if self._closing:
            return
        speaker = self.speaker
        outs = self.t.server(event)
        if speaker is not None:
            if isinstance(event, ReplyStarted):  # spoken or not: the response's modality
                response = self.t.responses.open.get(event.reply_id)
                spoken = response is not None and response.audio
                if speaker.muted == spoken:
                    speaker.set_muted(not spoken)
            speaker.observe(event)
        self._put(outs)
        if isinstance(event, ReplyDone):
            if speaker is None or speaker.muted or speaker.reply_id != event.reply_id:
                self._put(self.t.settled(event.reply_id))
            else:
                self._spawn(self._settle(speaker, event.reply_id))

    def _edit(self, call: Edit) -> None:
        """A history edit, queued on the engine in order with the turns
        submitted so far; its result is only logged (False: nothing to apply)."""
        live = self.live
        if live is None:  # (the translator starts the session before any edit)
            return
        session_id = live.session_id
        kind = type(call.edit).__name__
        try:
            future = self.host.engine.edit_history(live.conversation, call.edit)
        except NotImplementedError:
            refused = Unsupported("history edits with this engine")
            self._put([self.t.error(refused, self.t.event_id)])
            return

        def done(f: asyncio.Future[bool]) -> None:
            if f.cancelled():
                return
            exc = f.exception()
            if exc is not None or not f.result():
                logger.info(
                    "history edit not applied",
                    extra={"session_id": session_id, "edit": kind, "failed": exc is not None},
                )

        future.add_done_callback(done)

    async def _settle(self, speaker: ReplySpeaker, reply_id: str) -> None:
        while speaker.reply_id == reply_id and not self._closing:
            await asyncio.sleep(SETTLE_POLL_S)
        self._put(self.t.settled(reply_id))

    # -- input transcription: one at a time, beside the conversation -----------

    def _transcribe(self, call: Transcribe) -> None:
        if self._transcriber is None:
            self._transcriber = asyncio.ensure_future(self._transcribe_all())
            self._tasks.add(self._transcriber)
        try:
            self._transcripts.put_nowait(call)
        except asyncio.QueueFull:
            busy = Busy("too many transcriptions waiting")
            self._put([transcripts.failed(self.t.ids, call.item_id, busy)])

    async def _transcribe_all(self) -> None:
        engine = self.host.engine
        n = 0
        while True:
            call = await self._transcripts.get()
            n += 1
            conversation = engine.new_conversation(
                transcripts.SYSTEM, conversation_id=f"{self.t.session_id}-transcript-{n}"
            )
            turn = TurnInput(audio=call.audio, text=transcripts.request(call.language, call.prompt))
            handle = None
            try:
                handle = engine.submit(conversation, turn, transcripts.MAX_TOKENS)
                async for delta in handle:
                    if delta.text:
                        self._put([transcripts.delta(self.t.ids, call.item_id, delta.text)])
                text = handle.result.text.strip()
                seconds = len(call.audio) / SAMPLE_RATE
                done = transcripts.completed(self.t.ids, self.t.items, call.item_id, text, seconds)
                self._put([done])
            except asyncio.CancelledError:
                if handle is not None:
                    handle.cancel()
                raise
            except Exception as exc:
                self.host.report(exc, transport=TRANSPORT, session_id=self.session_id)
                self._put([transcripts.failed(self.t.ids, call.item_id, exc)])
            finally:
                engine.release(conversation)

    async def _speaker_event(self, event: ServerEvent) -> None:
        if isinstance(event, ReplyAudioStarted):
            self._audio_reply = event.reply_id
        self._put(self.t.server(event))

    async def _speaker_audio(self, pcm: bytes) -> None:
        if self._closing:
            return
        self._put(self.t.audio(pcm, self._audio_reply))  # paced by the speaker

    async def _playback(self, reply_id: str, playing: bool) -> None:
        if self.live is not None:
            await self.live.playback(reply_id, playing)

    # -- in ----------------------------------------------------------------------

    async def _watch_idle(self, idle: float) -> None:
        """Close (1000) after `idle` seconds without a client message while no
        reply runs and no audio goes out (as the native connection does)."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(max(0.05, self._last_seen + idle - loop.time()))
            # A reply's audio still being written is not idle (synthesis can
            # outlast the reply's text by longer than the timeout).
            self._last_seen = max(self._last_seen, self.outbox.last_write)
            live = self.live
            if live is not None and live.replies_in_flight:
                self._last_seen = loop.time()  # idle counts from the reply's end
                continue
            if loop.time() - self._last_seen < idle:
                continue
            self._closing = True
            wire = self.host.report(IdleTimeout(), transport=TRANSPORT, session_id=self.session_id)
            await close_or_abort(self.ws, wire.close_code or CLOSE_NORMAL, wire.message)
            return

    async def run(self) -> None:
        self.outbox.start()
        self._put(self.t.opening())
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        idle = self.config.idle_timeout
        if idle > 0:
            self._spawn(self._watch_idle(idle))
        try:
            while not self._closing:
                try:
                    message = await self.ws.recv()
                except ConnectionClosed:
                    break
                self._last_seen = loop.time()
                wait = self._messages.message()
                if wait > 0:
                    await asyncio.sleep(wait)
                if isinstance(message, bytes):
                    outs: list[Out] = [Failed(BadMessage("binary frames are not used here"), None)]
                else:
                    outs = self.t.client(message)
                for out in outs:
                    if isinstance(out, dict):
                        self._put([out])
                        continue
                    try:
                        await self._call(out)
                    except Exception as exc:
                        await self._fail(exc, self.t.event_id)
                        break  # the rest of this event's calls depended on this one
                self._sync()
        finally:
            await self._end()

    async def _fail(self, exc: BaseException, event_id: str | None) -> None:
        wire = self.host.report(exc, transport=TRANSPORT, session_id=self.session_id)
        if wire.close_code is not None:
            self._closing = True
            await self.outbox.flush(1.0)
            await close_or_abort(self.ws, wire.close_code, wire.message)
            return
        self._put([self.t.error(exc, event_id)])

    async def _call(self, call: Out) -> None:
        if isinstance(call, Failed):
            await self._fail(call.exc, call.event_id)
            return
        if isinstance(call, Start):
            await self._start(call)
            return
        if isinstance(call, Transcribe):
            self._transcribe(call)
            return
        if isinstance(call, Edit):
            self._edit(call)
            return
        if isinstance(call, Aside):
            self._spawn(
                run_aside(
                    self.host.engine,
                    call,
                    self.t,
                    self._put,
                    self._aside_handles,
                    conversation_id=f"{self.t.session_id}-{call.reply_id}",
                    report=self._report,
                )
            )
            return
        if isinstance(call, CancelAside):
            handle = self._aside_handles.get(call.reply_id)
            if handle is not None:
                handle.cancel()
            return
        live = self.live
        if isinstance(call, StopAudio):
            if self.speaker is not None:
                self.speaker.stop()
            return
        if live is None:  # the translator starts the session before any of these
            raise BadMessage("the session has not started")
        if isinstance(call, Feed):
            assert self.t.started is not None
            wait = self._pacer.audio(len(call.pcm) / (2 * self.t.started.sample_rate))
            if wait > 0:
                await asyncio.sleep(wait)
            await live.feed_audio(call.pcm)
        elif isinstance(call, Commit):
            await live.commit()
        elif isinstance(call, Respond):
            self._sync()
            if call.max_output_tokens is not None:
                live.max_new_tokens = call.max_output_tokens
            await live.turn(call.turn)
        elif isinstance(call, Cancel):
            await live.cancel()

    async def _start(self, call: Start) -> None:
        old = self.live
        resume = None
        if old is not None:
            resume = None if call.fresh else old.session_id
            self.live = None
            await self.host.end_session(old)
        live = await self.host.start_session(
            self.send,
            resume=resume,
            owner=self.owner,
            sample_rate=call.sample_rate,
            session_config=call.config,
        )
        if self._closing:
            await self.host.end_session(live)
            return
        self.live = live
        self._sync()
        logger.info(
            "openai realtime session started",
            extra={"session_id": live.session_id, "resumed": resume is not None},
        )

    def _sync(self) -> None:
        """Output settings onto the session and the speaker: max_output_tokens,
        spoken or not, the output rate (a new speaker when it changed)."""
        live = self.live
        if live is None:
            return
        s = self.t.settings
        live.max_new_tokens = s.max_output_tokens or self.config.max_new_tokens
        speaker = self.speaker
        rate = self.t.output_rate
        if speaker is not None and speaker.sample_rate != rate and not speaker.speaking:
            self._spawn(speaker.close())
            self.speaker = speaker = None
            self._audio_out = None
        if speaker is None and self.host.speech is not None:
            speaker = self.host.speaker(
                rate, self._speaker_event, self._speaker_audio, on_playback=self._playback
            )
            self.speaker = speaker
        if speaker is not None:
            live.stop_audio = speaker.stop
            if self._audio_out != s.audio_out:  # (Respond mutes per response)
                self._audio_out = s.audio_out
                speaker.set_muted(not s.audio_out)

    async def _end(self) -> None:
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._closes, return_exceptions=True)
        live = self.live
        if live is not None:
            await live.close()
        if self.speaker is not None:
            await self.speaker.close()
        await self.outbox.close()
        if live is not None:
            await self.host.end_session(live)
            logger.info(
                "openai realtime session ended",
                extra={"session_id": live.session_id, "close_code": self.ws.close_code},
            )
