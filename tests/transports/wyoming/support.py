"""A voice_agent server with --wyoming on a loopback port, for the Wyoming tests:
the scripted engine (transcribes audio as TRANSCRIPT, answers text with a
command for light.kitchen), the tone TTS, the test devices file."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
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


def wire(event: Event) -> bytes:
    """The wyoming package's own encoding of `event` (as async_write_event writes it)."""
    header: dict[str, object] = {"type": event.type, "version": "1.10.2"}
    data = json.dumps(event.data).encode() if event.data else b""
    if data:
        header["data_length"] = len(data)
    if event.payload:
        header["payload_length"] = len(event.payload)
    return json.dumps(header).encode() + b"\n" + data + (event.payload or b"")


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
    tmp_path: Path,
    *,
    speak: bool = True,
    token_delay: float = 0.001,
    tts_seconds: Callable[[str], float] = lambda text: 0.25,
    **overrides: Any,
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
    tts = ToneTTS(seconds=tts_seconds, rate=22050)
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
