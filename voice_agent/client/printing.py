"""EventPrinter: server events as text lines (`voice-agent client`)."""

from __future__ import annotations

import sys
from typing import TextIO

from voice_agent.protocol import (
    ErrorEvent,
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SessionStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    encode,
)


class EventPrinter:
    """One line per event; reply deltas inline as they stream."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self._inline: str | None = None  # reply id being printed inline

    def __call__(self, event: ServerEvent) -> None:
        out = self.out
        if isinstance(event, ReplyDelta):
            if self._inline != event.reply_id:
                self._end_line()
                out.write(f"reply {event.reply_id}: ")
                self._inline = event.reply_id
            out.write(event.text)
            out.flush()
            return
        self._end_line()
        out.write(self.format(event) + "\n")
        out.flush()

    def _end_line(self) -> None:
        if self._inline is not None:
            self.out.write("\n")
            self._inline = None

    @staticmethod
    def format(event: ServerEvent) -> str:
        if isinstance(event, SessionStarted):
            demo = " [DEMO MODEL: replies are random noise]" if event.demo_model else ""
            return f"session.started {event.session_id} model={event.model}{demo}"
        if isinstance(event, SpeechStartedEvent):
            return f"speech.started {event.utterance_id} at {event.start_ms} ms"
        if isinstance(event, SpeechStoppedEvent):
            joined = f", continues {event.continues}" if event.continues else ""
            return (
                f"speech.stopped {event.utterance_id} {event.start_ms}-{event.end_ms} ms"
                f" ({event.reason or 'silence'}{joined})"
            )
        if isinstance(event, ReplyStarted):
            return f"reply.started {event.reply_id} for {event.utterance_id or 'text'}"
        if isinstance(event, ReplyDone):
            tokens = event.usage.get("completion_tokens", 0)
            ttft = event.timing.get("ttft_ms", 0.0)
            return f"reply.done {event.reply_id} ({tokens} tokens, first after {ttft:.0f} ms)"
        if isinstance(event, ReplyCancelled):
            return f"reply.cancelled {event.reply_id} ({event.reason})"
        if isinstance(event, ReplyAudioStarted):
            return f"reply.audio.started {event.reply_id} ({event.sample_rate} Hz)"
        if isinstance(event, ReplyAudioDone):
            cut = ", cut off" if event.cancelled else ""
            return f"reply.audio.done {event.reply_id} ({event.duration_ms} ms{cut})"
        if isinstance(event, ErrorEvent):
            return f"error {event.code}: {event.message}"
        return encode(event)


def print_event(event: ServerEvent) -> None:
    """The default printer for stdout."""
    _STDOUT_PRINTER(event)


_STDOUT_PRINTER = EventPrinter()
