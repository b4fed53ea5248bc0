"""One realtime WebSocket: the native protocol (PROTOCOL.md) in front of one LiveSession.

Messages in -> host calls: session.start starts or resumes a session
(ConversationHost.start_session), audio and events go to its LiveSession, a
`cancel` also stops the reply's audio. Host events out -> the wire: each
event is encoded into the outbox (outbox.py); spoken replies (the host's
speaker) add `reply.audio.*` events and binary PCM frames, or go on the
WebRTC reply track (peer.py). Errors go through the host's report (one
mapping, errors.py): an `error` event, or a close for errors that close.

Limits: messages beyond `max_messages_per_second`, or audio beyond
`max_audio_speed` times real time (after a 10 s allowance), make the reader
wait before reading on (limits.py), so a fast sender is slowed by TCP and
nothing piles up; no client message for `idle_timeout` seconds while no reply
runs and nothing was written to it (a long reply's audio going out keeps it
open, a client that does not read it does not) closes with 1000
(errors.IdleTimeout); a client that stops reading fills its outbox and is
closed with 1008 (errors.SlowClient), its reply cancelled at once.

The audio fast path: the sans-I/O server (transports/sansio/) hands a
complete binary frame that arrives while `run()` waits in recv() with
nothing queued to the connection's `audio_sink`, here `_audio_now`, which
paces it and feeds it to the session at once (no queue, future or task
switch); anything it declines (no session yet, a bad frame, a frame the
rate limits hold back, a session that cannot take it now) goes through
recv() as usual, so messages keep their order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from websockets.exceptions import ConnectionClosed

from voice_agent.commands import valid_device_name
from voice_agent.errors import (
    CLOSE_NORMAL,
    CLOSE_POLICY,
    BadMessage,
    IdleTimeout,
    NotStarted,
    PolicyViolation,
    SlowClient,
)
from voice_agent.limits import AudioPacer, MessageLimiter
from voice_agent.live import LiveSession
from voice_agent.protocol import (
    AudioCommit,
    CancelReply,
    ClientEvent,
    Playback,
    ServerEvent,
    SessionStart,
    SessionStarted,
    SessionUpdate,
    TextTurn,
    WebRTCAnswer,
    WebRTCOffer,
    decode_client,
    encode,
    error_event,
)
from voice_agent.transports.sansio import Connection
from voice_agent.transports.websocket.outbox import Outbox, close_or_abort
from voice_agent.transports.websocket.peer import PeerLink
from voice_agent.tts.speaker import ReplySpeaker

if TYPE_CHECKING:
    from voice_agent.transports.websocket.app import WebSocketServerApp

logger = logging.getLogger("voice_agent.transports.websocket")

TRANSPORT = "realtime"  # the label this transport's errors are counted under


class _Connection:
    """One realtime WebSocket; see the module doc."""

    def __init__(self, app: WebSocketServerApp, ws: Connection) -> None:
        self.app = app
        self.host = app.host
        self.ws = ws
        self.live: LiveSession | None = None
        self.session_id: str | None = None
        self.owner = ""  # hash of the token this session was opened with
        self.audio_format = (16000, 1)  # (sample_rate, channels) from session.start
        self.output_rate = 16000  # the spoken replies' rate, from session.start
        self.peer = PeerLink(app.webrtc, app.peers)
        self.speaker: ReplySpeaker | None = None  # when this session's replies are spoken
        config = app.config
        self.outbox = Outbox(ws, config.send_queue)
        self._closing = False
        self._last_seen = 0.0  # loop time of the last client message
        self._messages = MessageLimiter(config.max_messages_per_second, time.monotonic)
        self._pacer = AudioPacer(config.max_audio_speed, time.monotonic)
        # Set when the fast path paced a frame and passed it on: run() waits
        # this long for that frame (the next message it gets) instead of
        # pacing it again.
        self._prepaid: float | None = None
        self._tasks: set[asyncio.Task[bool]] = set()
        self._loop = asyncio.get_running_loop()

    @property
    def fast_frames(self) -> int:
        """Audio frames the fast path took."""
        return self.ws.fast_frames

    @property
    def queued(self) -> int:
        """Events and audio frames waiting to be written (the send queue)."""
        return self.outbox.queued

    # -- host events -> the wire -------------------------------------------

    async def send(self, event: ServerEvent) -> None:
        """Queue one event; never blocks. A closed peer is not an error (run()
        sees it); a full queue means the client stopped reading: close 1008."""
        if self._closing:
            return
        if self.speaker is not None:
            self.speaker.observe(event)  # a cancel stops the audio before it is queued
            self.peer.route(event)
        if not self.outbox.put(encode(event)):
            self._too_slow()

    async def send_audio(self, pcm: bytes) -> None:
        """Queue one binary frame of reply audio (waits while the outbox is half
        full); a reply routed to the WebRTC track is written there instead."""
        track = self.peer.track
        if track is not None and self.speaker is not None:
            await track.write(pcm, self.speaker.sample_rate)
            return
        if not self._closing:
            await self.outbox.put_audio(pcm)

    def _too_slow(self) -> None:
        self._closing = True
        self.app.counters["slow_consumer_closes_total"] += 1
        logger.warning(
            "client not reading, closing",
            extra={"session_id": self.session_id, "queued": self.outbox.queued},
        )
        self.app.track(self._close_slow())

    async def _close_slow(self) -> None:
        wire = self.host.report(SlowClient(), transport=TRANSPORT, session_id=self.session_id or "")
        if self.live is not None:
            await self.live.close()  # cancels its generation now
        self.outbox.stop_writing()
        await close_or_abort(self.ws, wire.close_code or CLOSE_POLICY, wire.message)

    async def flush(self, timeout: float) -> None:
        await self.outbox.flush(timeout)

    async def _fail(self, exc: BaseException) -> bool:
        """Answer a message that failed: an error event, or close the
        connection for errors that close it (True: the connection is done)."""
        wire = self.host.report(exc, transport=TRANSPORT, session_id=self.session_id or "")
        if wire.close_code is not None:
            if isinstance(exc, PolicyViolation):
                self.app.counters["auth_failures_total"] += 1
            await self.flush(1.0)
            await self.ws.close(wire.close_code, wire.message)
            return True
        await self.send(error_event(exc))
        return False

    # -- limits ---------------------------------------------------------------

    async def _watch_idle(self, idle: float) -> None:
        """Close the connection (1000) after `idle` seconds without a client
        message while no reply runs. One sleeping task per connection, not a
        timer per message (that cost 15 % of the server's CPU under load)."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(max(0.05, self._last_seen + idle - loop.time()))
            live = self.live
            # a reply's audio still being written (read by the client) is not idle
            self._last_seen = max(self._last_seen, self.outbox.last_write)
            if loop.time() - self._last_seen < idle or (live and live.replies_in_flight):
                if live and live.replies_in_flight:
                    self._last_seen = loop.time()  # idle counts from the reply's end
                continue
            self._closing = True
            self.app.counters["idle_closes_total"] += 1
            logger.info("idle session closed", extra={"session_id": self.session_id})
            wire = self.host.report(
                IdleTimeout(), transport=TRANSPORT, session_id=self.session_id or ""
            )
            await close_or_abort(self.ws, wire.close_code or CLOSE_NORMAL, wire.message)
            return

    def _wait_for(self, message: str | bytes) -> float:
        """Seconds the message and audio rate limits ask to wait before this
        message is handled (limits.py); spends the message's allowance."""
        now = time.monotonic()  # one clock read for both limits
        wait = self._messages.message(now)
        if isinstance(message, bytes) and self.live is not None:
            rate, channels = self.audio_format
            wait = max(wait, self._pacer.audio(len(message) / (2 * channels * rate), now))
            if wait > 0:  # (nothing to count for the usual frame: no dict update)
                self.app.counters["throttled_seconds_total"] += wait
        return wait

    async def _pace(self, message: str | bytes) -> None:
        wait, self._prepaid = self._prepaid, None
        if wait is None:
            wait = self._wait_for(message)
        if wait > 0:
            await asyncio.sleep(wait)

    def _audio_now(self, pcm: bytes) -> bool:
        """The fast path (called by the server with run() waiting in recv()):
        pace and feed one audio frame now. False
        passes the frame on to run(), which handles it in order."""
        live = self.live
        if live is None or self._closing or live.closed:
            return False
        if len(pcm) % (2 * self.audio_format[1]):
            return False  # run() reports the bad frame
        self._last_seen = self._loop.time()
        wait = self._wait_for(pcm)
        if wait <= 0:
            try:
                if live.feed_audio_now(pcm):
                    return True
            except Exception as exc:  # as run() would: an error event, or a close
                task = self._loop.create_task(self._fail(exc), name="frame-error")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return True
        self._prepaid = wait  # paced here: run() must not count it again
        return False

    # -- the wire -> host calls ----------------------------------------------

    async def run(self) -> None:
        self.outbox.start()
        self.ws.audio_sink = self._audio_now  # the fast path (see the module doc)
        loop = asyncio.get_running_loop()
        self._last_seen = loop.time()
        idle = self.app.config.idle_timeout
        watchdog = asyncio.create_task(self._watch_idle(idle)) if idle > 0 else None
        try:
            while not self._closing:
                try:
                    message = await self.ws.recv()
                except ConnectionClosed:
                    break
                self._last_seen = loop.time()
                await self._pace(message)
                if self._closing:
                    break
                try:
                    await self._on_message(message)
                except Exception as exc:
                    if await self._fail(exc):
                        break
        finally:
            self.ws.audio_sink = None
            if watchdog is not None:
                watchdog.cancel()
                await asyncio.gather(watchdog, return_exceptions=True)
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._end()

    async def _end(self) -> None:
        await self.peer.close()
        live = self.live
        if live is not None:
            await live.close()
        if self.speaker is not None:
            await self.speaker.close()
        await self.outbox.close()
        if live is None:
            return
        await self.host.end_session(live)
        logger.info(
            "session ended",
            extra={"session_id": live.session_id, "close_code": self.ws.close_code},
        )

    def _not_started(self, what: str) -> Exception:
        if self.app.access.tokens:
            return PolicyViolation("send session.start with the token first")
        return NotStarted(f"send session.start before {what}")

    async def _on_message(self, message: str | bytes) -> None:
        live = self.live
        if isinstance(message, bytes):
            if live is None:
                raise self._not_started("audio")
            await live.feed_audio(message)
            return
        event = decode_client(message)
        if isinstance(event, SessionStart):
            await self._start(event)
            return
        if live is None:
            raise self._not_started(event.type)
        await self._dispatch(live, event)

    async def _dispatch(self, live: LiveSession, event: ClientEvent) -> None:
        if isinstance(event, TextTurn):
            await live.text(event.text)
        elif isinstance(event, AudioCommit):
            await live.commit()
        elif isinstance(event, CancelReply):
            if self.speaker is not None:
                self.speaker.stop()  # also the audio of a reply whose text is done
                self.peer.clear()
            await live.cancel()
        elif isinstance(event, WebRTCOffer):
            answer = await self.peer.offer(
                live,
                event.sdp,
                self.app.config,
                self.audio_format,
                speak=self.speaker is not None,
            )
            await self.send(WebRTCAnswer(answer))
        elif isinstance(event, Playback):
            pass  # accepted; what was heard is not used yet
        elif isinstance(event, SessionUpdate):
            self._speak(live, event.speak)
        else:  # a second session.start
            raise BadMessage("the session has already started")

    def _speak(self, live: LiveSession, on: bool) -> None:
        """Spoken replies on or off (session.start, session.update). Off mutes
        the speaker: the reply speaking stops now, later ones are not
        synthesized. On in a session started without them makes the speaker:
        its audio then goes as binary frames (no WebRTC track was negotiated).
        A server that does not speak ignores it."""
        speaker = self.speaker
        if speaker is not None:
            if not on:
                self.peer.clear()
            speaker.set_muted(not on)
            return
        if not on:
            return
        self.speaker = self.host.speaker(
            self.output_rate,
            self.send,
            self.send_audio,
            on_playback=live.playback,  # barge-in asks longer speech while it is heard
        )
        if self.speaker is not None:
            live.stop_audio = self.speaker.stop  # a barge-in on a finished reply's audio

    async def _start(self, start: SessionStart) -> None:
        if self.live is not None:
            raise BadMessage("the session has already started")
        self.owner = self.app.access.owner(start.token)  # PolicyViolation: close 1008
        device = start.device
        if device is not None and not valid_device_name(device):
            raise BadMessage("session.start: 'device' must match [A-Za-z0-9_-]{1,64}")
        live = await self.host.start_session(
            self.send,
            resume=start.session_id,
            owner=self.owner,
            sample_rate=start.sample_rate,
            channels=start.channels,
            system_prompt=start.system_prompt,
            device=device,
        )
        if self.live is not None or self._closing:
            await self.host.end_session(live)
            raise BadMessage("the session has already started")
        self.live = live
        self.session_id = live.session_id
        self.audio_format = (start.sample_rate, start.channels)
        self.output_rate = start.output_sample_rate
        if start.speak is not False:
            self._speak(live, True)
        engine = self.host.engine
        await self.send(
            SessionStarted(live.session_id, engine.model_name, engine.demo_model, start.sample_rate)
        )
