"""server_vad's idle_timeout_ms (pure, by sample count): after a response
has ended (its audio has gone out), that much input audio without speech
triggers input_audio_buffer.timeout_triggered, an empty user audio item and
a response (the model is prompted to go on: IDLE_TEXT as the user turn)."""

from __future__ import annotations

from typing import Any

from voice_agent.transports.openai_realtime.items import Ids

IDLE_TEXT = "(The user has been silent for a while.)"


class IdleTimer:
    def __init__(self) -> None:
        self.since_ms: int | None = None  # input position when the timer started

    def arm(self, position_ms: int) -> None:
        self.since_ms = position_ms

    def disarm(self) -> None:
        self.since_ms = None

    def due(self, position_ms: int, timeout_ms: int | None) -> int | None:
        """Once `timeout_ms` of input has passed: where the timer started
        (then it is disarmed); else None."""
        since = self.since_ms
        if timeout_ms is None or since is None or position_ms - since < timeout_ms:
            return None
        self.since_ms = None
        return since


def triggered(ids: Ids, start_ms: int, end_ms: int, item_id: str) -> dict[str, Any]:
    return ids.event(
        "input_audio_buffer.timeout_triggered",
        audio_start_ms=start_ms,
        audio_end_ms=end_ms,
        item_id=item_id,
    )
