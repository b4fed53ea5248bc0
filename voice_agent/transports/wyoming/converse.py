"""The conversation agent: `transcript` in, `handled` (or `not-handled`) out.

Home Assistant's Wyoming conversation agent sends one `transcript` per
sentence with context {"conversation_id", "device_id"?, "satellite_id"?}.
Each Home Assistant conversation is one conversation of the host, key
`wyoming:CONVERSATION_ID`, owner "wyoming" (no WebSocket client can resume
it), kept in memory with its KV cache between sentences and in the --db store,
through host.start_request / end_request like an MQTT request (one turn of a
one-request session: the Session checks the text, parses the reply's
commands against --devices and counts the rejected ones). A transcript
without a conversation id gets a new one, returned in `handled`'s context.

Commands: the reply's validated commands go to the host's command bus as a
WebSocket session's would (bus.publish: the MQTT transport publishes
PREFIX/DEVICE/command) and to the WebSocket sessions of that device
(bus.deliver). `handled` carries the reply without its <command> tags
(spoken_text). DEVICE is the context's `device_id` when it is a valid device
name ([A-Za-z0-9_-]{1,64}; Home Assistant's device ids are), else "wyoming".

A turn that fails (the conversation answers another sentence: busy, text
too long, the engine failed) is `not-handled` with the error's client-safe
message; counted like MQTT's (host.report, or the session's metrics for the
engine's errors).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from wyoming.event import Event
from wyoming.handle import Handled, NotHandled

from voice_agent.commands import Command, valid_device_name
from voice_agent.engine.base import TurnInput
from voice_agent.errors import BadMessage, VoiceAgentError
from voice_agent.host import ConversationHost
from voice_agent.live import LiveSession
from voice_agent.protocol import CommandEvent, ErrorEvent, ReplyCancelled, ReplyDone, ServerEvent

logger = logging.getLogger("voice_agent.wyoming")

OWNER = "wyoming"
TRANSPORT = "wyoming"
DEFAULT_DEVICE = "wyoming"
CONVERSATION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
CHECK_S = 1.0  # seconds between checks that the session still runs the turn
_COMMAND_TAG = re.compile(r"<command>.*?(?:</command>|$)", re.DOTALL)


def spoken_text(reply: str) -> str:
    """The reply without its <command> tags (an unclosed last one too), spaces
    collapsed: what Home Assistant shows and speaks."""
    return " ".join(_COMMAND_TAG.sub(" ", reply).split())


def conversation_id(context: Any) -> str:
    """The context's conversation id; a new one when there is none.
    BadMessage when it is not an id."""
    if not isinstance(context, dict) or context.get("conversation_id") in (None, ""):
        return uuid.uuid4().hex
    value = context["conversation_id"]
    if not isinstance(value, str) or CONVERSATION_ID.fullmatch(value) is None:
        raise BadMessage("context.conversation_id must be 1 to 128 of [A-Za-z0-9_.:-]")
    return value


def device_of(context: Any) -> str:
    """The requesting device of the context (see the module doc)."""
    if isinstance(context, dict):
        device = context.get("device_id")
        if isinstance(device, str) and valid_device_name(device):
            return device
    return DEFAULT_DEVICE


class Reply:
    """The events of one sentence's turn."""

    def __init__(self) -> None:
        self.done: ReplyDone | None = None
        self.cancelled: ReplyCancelled | None = None
        self.error: ErrorEvent | None = None
        self.commands: list[Command] = []
        self._ended = asyncio.Event()

    @property
    def text(self) -> str:
        if self.done is not None:
            return self.done.text
        return self.cancelled.text if self.cancelled is not None else ""

    async def send(self, event: ServerEvent) -> None:
        """The session's event callback (never raises, never waits)."""
        if isinstance(event, CommandEvent):
            self.commands.append(Command(event.action, event.target, event.value))
        elif isinstance(event, ReplyDone):
            self.done = event
            self._ended.set()
        elif isinstance(event, ReplyCancelled):
            self.cancelled = event
            self._ended.set()
        elif isinstance(event, ErrorEvent):
            self.error = event
            self._ended.set()

    async def wait(self, live: LiveSession) -> None:
        """Until the turn ended and its events were sent (commands follow
        reply.done); RuntimeError when the session ran no turn and sent no end."""
        while not self._ended.is_set():
            try:
                await asyncio.wait_for(self._ended.wait(), CHECK_S)
            except TimeoutError:
                if live.replies_in_flight == 0:
                    await live.settled()
                    if not self._ended.is_set():
                        raise RuntimeError("the turn ended without a reply") from None
        await live.settled()


async def converse(host: ConversationHost, data: dict[str, Any]) -> Event:
    """The answer to one `transcript` event's data (see the module doc)."""
    context = data.get("context")
    device = device_of(context)
    cid = ""
    started = time.perf_counter()
    try:
        text = data.get("text")
        if not isinstance(text, str):
            raise BadMessage("transcript needs a text")
        cid = conversation_id(context)
        reply = await _turn(host, f"{OWNER}:{cid}", device, text)
    except VoiceAgentError as exc:
        wire = host.report(exc, transport=TRANSPORT, session_id=cid, device=device)
        return NotHandled(text=wire.message, context=_context(cid)).event()
    if reply.error is not None:  # counted by the session's metrics
        return NotHandled(text=reply.error.message, context=_context(cid)).event()
    bus = host.bus
    for command in reply.commands:
        if bus is not None:
            await bus.publish(device, command)  # MQTT: PREFIX/DEVICE/command
            await bus.deliver(device, command)  # the device's WebSocket sessions
    seconds = time.perf_counter() - started
    host.metrics.turn_latency.labels(TRANSPORT).observe(seconds)
    logger.info(
        "wyoming handled",
        extra={
            "session_id": f"{OWNER}:{cid}",
            "device": device,
            "commands": len(reply.commands),
            "total_ms": round(seconds * 1000.0, 1),
        },
    )
    return Handled(text=spoken_text(reply.text), context=_context(cid)).event()


def _context(cid: str) -> dict[str, Any] | None:
    return {"conversation_id": cid} if cid else None


async def _turn(host: ConversationHost, key: str, device: str, text: str) -> Reply:
    reply = Reply()
    live, _ = await host.start_request(
        key, reply.send, owner=OWNER, transport=TRANSPORT, device=device
    )
    try:
        await live.turn(TurnInput(text=text))
        await reply.wait(live)
    finally:
        await host.end_request(live)
    return reply
