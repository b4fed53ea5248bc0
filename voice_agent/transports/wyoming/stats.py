"""The Wyoming server's counters, exported at /metrics as voice_agent_wyoming_*."""

from __future__ import annotations

from dataclasses import dataclass

from voice_agent.metrics import Metric, counter, gauge


@dataclass
class WyomingStats:
    connections: int = 0  # accepted (admitted or not)
    refused: int = 0  # refused by admission (an error event, then closed)
    open: int = 0  # open now
    events: int = 0  # events read
    bad_events: int = 0  # unknown types, malformed fields, out of order
    bad_frames: int = 0  # malformed or oversized events (closed)
    bad_audio: int = 0  # audio before audio-start, bad formats, partial frames, too long
    vanished: int = 0  # clients gone in the middle of an event or an answer
    idle_closed: int = 0  # closed after idle_timeout without an event
    errors: int = 0  # error events sent
    transcripts: int = 0  # transcriptions answered
    handled: int = 0  # transcripts answered with handled
    not_handled: int = 0  # ... with not-handled
    synthesized: int = 0  # synthesize requests answered

    def families(self) -> list[Metric]:
        c = counter
        return [
            c("wyoming_connections", "Wyoming connections accepted", self.connections),
            c("wyoming_refused", "Wyoming connections refused by admission", self.refused),
            gauge("wyoming_connections_open", "Wyoming connections open now", self.open),
            c("wyoming_events", "Wyoming events read", self.events),
            c(
                "wyoming_bad_events",
                "Wyoming events unknown, malformed or out of order",
                self.bad_events,
            ),
            c(
                "wyoming_bad_frames",
                "Wyoming events malformed or over the size limits (closed)",
                self.bad_frames,
            ),
            c(
                "wyoming_bad_audio",
                "Wyoming audio refused (order, format, partial frames, length)",
                self.bad_audio,
            ),
            c(
                "wyoming_vanished",
                "Wyoming clients gone in the middle of an event or an answer",
                self.vanished,
            ),
            c(
                "wyoming_idle_closed",
                "Wyoming connections closed after idle_timeout",
                self.idle_closed,
            ),
            c("wyoming_error_events", "Wyoming error events sent", self.errors),
            c("wyoming_transcripts", "Wyoming transcriptions answered", self.transcripts),
            c("wyoming_handled", "Wyoming transcripts answered with handled", self.handled),
            c(
                "wyoming_not_handled",
                "Wyoming transcripts answered with not-handled",
                self.not_handled,
            ),
            c("wyoming_synthesized", "Wyoming synthesize requests answered", self.synthesized),
        ]
