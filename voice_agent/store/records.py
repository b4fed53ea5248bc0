"""What the store keeps and lists: StoredSession, SessionSummary, and a
stored conversation rendered as text lines (`voice-agent sessions`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voice_agent.engine.types import SAMPLE_RATE, History


@dataclass
class StoredSession:
    """One stored conversation."""

    session_id: str
    owner: str = ""
    device: str | None = None
    system_prompt: str | None = None
    created: float = 0.0
    updated: float = 0.0
    ids_used: tuple[int, int] = (0, 0)
    history: History = field(default_factory=History)


@dataclass(frozen=True)
class SessionSummary:
    session_id: str
    device: str | None
    created: float
    updated: float
    turns: int


def render_messages(messages: list[dict[str, Any]], clip_samples: list[int]) -> list[str]:
    """One line per message, `role: text`, audio items as `[audio N.N s]`."""
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            text = content
        else:
            parts = []
            for part in content or []:
                if part.get("type") == "audio":
                    tail = str(part.get("audio", "")).rsplit("-", 1)[-1]
                    n = int(tail) - 1 if tail.isdigit() else -1
                    seconds = clip_samples[n] / SAMPLE_RATE if 0 <= n < len(clip_samples) else 0
                    parts.append(f"[audio {seconds:.1f} s]")
                elif part.get("type") == "text":
                    parts.append(str(part.get("text", "")))
            text = " ".join(parts)
        lines.append(f"{message.get('role', '?')}: {text}")
    return lines
