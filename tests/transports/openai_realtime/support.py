"""Shared pieces of the OpenAI Realtime translation tests (no network)."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

from voice_agent.session import SessionConfig
from voice_agent.transports.openai_realtime.calls import Out
from voice_agent.transports.openai_realtime.translator import Translator

BASE = SessionConfig(system_prompt="server prompt")


def config_for(prompt: str | None) -> SessionConfig:
    return BASE if prompt is None else dataclasses.replace(BASE, system_prompt=prompt)


def translator(*, can_speak: bool = True) -> Translator:
    return Translator(config_for, model="qwen2-audio", tag="t", can_speak=can_speak)


def send(t: Translator, kind: str, **fields: Any) -> list[Out]:
    return t.client(json.dumps({"type": kind, **fields}))


def events(outs: list[Any]) -> list[dict[str, Any]]:
    return [o for o in outs if isinstance(o, dict)]


def types(outs: list[Any]) -> list[str]:
    """GA event types (dicts) and call class names, in order."""
    return [o["type"] if isinstance(o, dict) else type(o).__name__ for o in outs]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
