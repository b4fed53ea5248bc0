"""A voice_agent server with --wyoming on a loopback port, for the Wyoming tests:
the scripted engine (transcribes audio as TRANSCRIPT, answers text with a
command for light.kitchen), the tone TTS, the test devices file."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wyoming.client import AsyncTcpClient
from wyoming.event import Event

from tests.helpers.devices import write_devices
from tests.helpers.tts import ToneTTS
from voice_agent.commands import Command
from voice_agent.config import Config
from voice_agent.engine.base import TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.server import Services, running
from voice_agent.tts.speaker import Speech

TRANSCRIPT = "turn on the kitchen light"
REPLY = 'Done. <command>{"action": "on", "target": "light.kitchen"}</command>'
TIMEOUT = 20.0


def script(turn: TurnInput) -> str:
    if turn.audio is not None:
        return TRANSCRIPT
    return REPLY


@dataclass
class Served:
    services: Services
    engine: ScriptedEngine
    tts: ToneTTS
    published: list[tuple[str, Command]] = field(default_factory=list)

    @property
    def port(self) -> int:
        assert self.services.wyoming is not None
        return self.services.wyoming.port

    def client(self) -> AsyncTcpClient:
        return AsyncTcpClient("127.0.0.1", self.port)


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, speak: bool = True, token_delay: float = 0.001, **overrides: Any
) -> AsyncIterator[Served]:
    overrides.setdefault("db", "none")
    config = Config(
        host="127.0.0.1",
        port=0,
        tts="none",
        devices=str(write_devices(tmp_path)),
        wyoming="tcp://127.0.0.1:0",
        **overrides,
    )
    engine = ScriptedEngine(script, token_delay=token_delay)
    tts = ToneTTS(seconds=lambda text: 0.25, rate=22050)
    speech = Speech(tts) if speak else None
    try:
        async with running(config, engine, speech=speech) as services:
            served = Served(services, engine, tts)

            async def sink(device: str, command: Command) -> None:
                served.published.append((device, command))

            services.bus.attach(sink)  # stands in for the MQTT transport
            yield served
    finally:
        if speech is not None:
            speech.close()


async def read_until(client: AsyncTcpClient, *types: str) -> list[Event]:
    """Events until one of `types` (included); AssertionError if the server closes."""
    import asyncio

    events: list[Event] = []
    while True:
        event = await asyncio.wait_for(client.read_event(), TIMEOUT)
        assert event is not None, f"closed after {[e.type for e in events]}"
        events.append(event)
        if event.type in types:
            return events
