"""One MQTT request's turn: the events of its one-request session in, MQTT out.

The transport opens a session for the request on the host
(host.start_request), gives it the request as one whole turn
(LiveSession.turn) and this Answer's `send` as the session's event callback:

    reply.delta      -> PREFIX/DEVICE/reply/delta {"id", "text"} (QoS 0) at once,
                        and its text to the WavReply when the server speaks
    reply.done       -> kept: the transport publishes PREFIX/DEVICE/reply once
                        the commands are out
    command          -> kept (the Session parsed and validated them and counted
                        the rejected ones); published after the reply's end
    error            -> the request's error (the engine refused or failed it),
                        already counted by the session's metrics
    reply.cancelled  -> ends the turn with the text sent so far (only a barge-in
                        or a client cancel does that; MQTT has neither)

Nothing else a session sends (reply.started) goes on the MQTT wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from voice_agent.commands import Command
from voice_agent.host.speaking import WavReply
from voice_agent.live import LiveSession
from voice_agent.protocol import (
    CommandEvent,
    ErrorEvent,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ServerEvent,
)
from voice_agent.tts.speaker import Speech

from .link import dumps

Out = Callable[[str, bytes, int], None]

# Seconds between checks that the session still runs the turn (a turn that
# ended without an event, which only a bug does, must not block the device).
CHECK_S = 1.0


class TurnLost(RuntimeError):
    """The session ended the turn without a reply or an error (a bug, logged)."""


class Answer:
    """The events of one request's turn; see the module doc."""

    def __init__(self, request_id: str, delta_topic: str, out: Out) -> None:
        self.request_id = request_id
        self.delta_topic = delta_topic
        self._out = out
        self.done: ReplyDone | None = None
        self.cancelled: ReplyCancelled | None = None
        self.error: ErrorEvent | None = None
        self.commands: list[Command] = []
        self.wav: WavReply | None = None
        self._ended = asyncio.Event()

    def speak(self, speech: Speech | None) -> None:
        """Speak the reply (one WAV, `wav_bytes`) when the server speaks."""
        if speech is not None:
            self.wav = WavReply(speech)

    @property
    def text(self) -> str:
        if self.done is not None:
            return self.done.text
        return self.cancelled.text if self.cancelled is not None else ""

    async def send(self, event: ServerEvent) -> None:
        """The session's event callback (never raises, never waits)."""
        if isinstance(event, ReplyDelta):
            self._out(self.delta_topic, dumps({"id": self.request_id, "text": event.text}), 0)
            if self.wav is not None:
                self.wav.feed(event.text)
        elif isinstance(event, CommandEvent):
            self.commands.append(Command(event.action, event.target, event.value))
        elif isinstance(event, ReplyDone):
            self.done = event
            if self.wav is not None:
                self.wav.finish()
            self._ended.set()
        elif isinstance(event, ErrorEvent | ReplyCancelled):
            if isinstance(event, ErrorEvent):
                self.error = event
            else:
                self.cancelled = event
            self.cancel_speech()
            self._ended.set()

    async def wait(self, live: LiveSession) -> None:
        """Until the turn has ended and every event it caused was sent (the
        commands follow reply.done). TurnLost when the session ran no turn
        and sent no end."""
        while not self._ended.is_set():
            try:
                await asyncio.wait_for(self._ended.wait(), CHECK_S)
            except TimeoutError:
                if live.replies_in_flight == 0:
                    await live.settled()  # an end on its way is sent first
                    if not self._ended.is_set():
                        raise TurnLost("the turn ended without a reply") from None
        await live.settled()

    def cancel_speech(self) -> None:
        if self.wav is not None:
            self.wav.cancel()

    async def wav_bytes(self) -> bytes | None:
        """The spoken reply as one WAV (None: not spoken, nothing said, or
        speech failed)."""
        if self.wav is None or self.done is None:
            return None
        return await self.wav.wav()
