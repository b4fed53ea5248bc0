"""Helpers of the OpenAI Realtime client tests (tests/e2e/test_openai_*.py):
a voice_agent server on loopback for the official `openai` SDK, Pipecat and
LiveKit, the recordings as the 24 kHz PCM16 those clients send, and a log of
the server events checked against the SDK's own GA event models.

The tests are black-box: they know the wire (the GA event set) and the
public server API (Config, running_server), never the transport's modules.
"""

from __future__ import annotations

import asyncio
import base64
import json
import typing
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import soundfile
import soxr
from openai import AsyncOpenAI
from openai.types.realtime import RealtimeServerEvent

from voice_agent.config import Config
from voice_agent.engine.base import Engine
from voice_agent.transports.websocket import WebSocketServerApp, running_server
from voice_agent.tts.speaker import Speech

KEY = "o2-test-key"
MODEL = "qwen2-audio"
RATE = 24000  # audio/pcm in the GA API: 24 kHz mono PCM16 little-endian
MAX_TOKENS = 12  # the test server's max_new_tokens (config() below)
WAIT = 90.0  # generous: 2 shared cores, a real model

Event = dict[str, Any]


def _server_event_models() -> dict[str, type[pydantic.BaseModel]]:
    """Every GA server event type -> the SDK's model of it (from the
    RealtimeServerEvent union: the names the SDK knows; the retired beta
    names such as `response.audio.delta` are not among them)."""
    union = typing.get_args(RealtimeServerEvent)[0]
    out: dict[str, type[pydantic.BaseModel]] = {}
    for model in typing.get_args(union):
        for name in typing.get_args(model.model_fields["type"].annotation):
            out[name] = model
    return out


SERVER_EVENTS = _server_event_models()


def schema_problem(event: Event) -> str | None:
    """Why `event` is not a valid GA server event by the SDK's models (the
    first error, with its field path), or None when it is."""
    kind = event.get("type")
    model = SERVER_EVENTS.get(kind) if isinstance(kind, str) else None
    if model is None:
        return f"unknown server event type {kind!r}"
    try:
        model.model_validate(event)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        return f"{kind}: field {where!r}: {first['msg']} (got {first.get('input')!r:.120})"
    return None


# ------------------------------------------------------------------ the server


def config(**fields: Any) -> Config:
    """The test server's config: loopback, a free port, no store, the key."""
    base: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 0,
        "db": "none",
        "max_new_tokens": MAX_TOKENS,
        "token": KEY,
    }
    return Config(**{**base, **fields})


@asynccontextmanager
async def openai_server(
    engine: Engine, *, speech: Speech | None = None, **fields: Any
) -> AsyncIterator[WebSocketServerApp]:
    """A real voice_agent server on loopback (the engine stays open)."""
    async with running_server(config(**fields), engine, close_engine=False, speech=speech) as app:
        yield app


def base_url(app: WebSocketServerApp) -> str:
    """What every OpenAI client is given: http://127.0.0.1:PORT/v1."""
    return f"http://127.0.0.1:{app.port}/v1"


def sdk(app: WebSocketServerApp, key: str = KEY) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=base_url(app), api_key=key, max_retries=0)


# ------------------------------------------------------------------- the audio


def pcm24(path: Path, *, before: float = 0.5, after: float = 1.5) -> bytes:
    """A recording as 24 kHz mono PCM16 with silence around it (soundfile +
    soxr directly: the input does not depend on the server's own code)."""
    data, rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    mono = data.mean(axis=1)
    audio = soxr.resample(mono, rate, RATE) if rate != RATE else mono
    audio = np.concatenate([np.zeros(round(before * RATE)), audio, np.zeros(round(after * RATE))])
    pcm: bytes = (np.clip(audio, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return pcm


def silence(seconds: float) -> bytes:
    return bytes(2 * round(seconds * RATE))


def pcm_of(deltas: list[Event]) -> bytes:
    """The PCM of response.output_audio.delta events (base64 `delta`)."""
    return b"".join(base64.b64decode(d["delta"]) for d in deltas)


async def append_audio(
    send: Callable[[Any], Any], pcm: bytes, *, chunk_ms: int = 40, speed: float = 2.0
) -> None:
    """input_audio_buffer.append events of `chunk_ms`, paced at `speed` x real
    time (0 or less: as fast as possible)."""
    step = RATE * 2 * chunk_ms // 1000
    loop = asyncio.get_running_loop()
    start = loop.time()
    for n, i in enumerate(range(0, len(pcm), step)):
        chunk = base64.b64encode(pcm[i : i + step]).decode("ascii")
        await send({"type": "input_audio_buffer.append", "audio": chunk})
        if speed > 0:
            due = start + (n + 1) * chunk_ms / 1000 / speed
            await asyncio.sleep(max(0.0, due - loop.time()))


# ------------------------------------------------------------------ the events


class EventLog:
    """Every server event of one connection, in order, each checked against
    the SDK's GA models (schema problems are kept and fail `wait`).

    `receive` is the client's own way to read one raw message (the SDK's
    `recv_bytes`, a websockets `recv`); it raises when the connection ends."""

    def __init__(self, receive: Callable[[], Any]) -> None:
        self._receive = receive
        self.events: list[Event] = []
        self.problems: list[str] = []
        self.closed: BaseException | None = None
        self.expected_errors = 0  # errors a test waited for (errors_ok): not failures
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventLog:
        self._task = asyncio.create_task(self._pump())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _pump(self) -> None:
        try:
            while True:
                raw = await self._receive()
                event = json.loads(raw)
                problem = schema_problem(event)
                if problem is not None:
                    self.problems.append(problem)
                self.events.append(event)
                self._changed.set()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the connection ended
            self.closed = exc
            self._changed.set()

    def of(self, kind: str, **match: Any) -> list[Event]:
        return [
            e
            for e in self.events
            if e["type"] == kind and all(e.get(k) == v for k, v in match.items())
        ]

    def types(self, *, skip_deltas: bool = True) -> list[str]:
        return [
            e["type"] for e in self.events if not (skip_deltas and e["type"].endswith(".delta"))
        ]

    def errors(self) -> list[Event]:
        return self.of("error")

    async def wait(
        self,
        kind: str,
        n: int = 1,
        *,
        timeout: float = WAIT,
        errors_ok: bool = False,
        where: Callable[[Event], bool] | None = None,
        **match: Any,
    ) -> Event:
        """The `n`th event of type `kind` (matching `match` fields and
        `where`); fails on an `error` event (unless errors_ok; the errors up
        to one waited for that way are expected, not failures), on a schema
        problem, on the connection ending, or after `timeout` s."""
        async with asyncio.timeout(timeout):
            while True:
                assert not self.problems, f"events that break the GA schema: {self.problems}"
                if not errors_ok:
                    unexpected = self.errors()[self.expected_errors :]
                    assert not unexpected, f"server sent error: {unexpected}"
                found = [e for e in self.of(kind, **match) if where is None or where(e)]
                if len(found) >= n:
                    if errors_ok:
                        self.expected_errors = len(self.errors())
                    return found[n - 1]
                assert self.closed is None, (
                    f"connection ended ({self.closed!r}) while waiting for {kind}; "
                    f"events so far: {self.types()}"
                )
                self._changed.clear()
                await self._changed.wait()

    async def quiet(self, seconds: float) -> list[Event]:
        """What arrives in the next `seconds`."""
        before = len(self.events)
        await asyncio.sleep(seconds)
        return self.events[before:]


def response_events(log: EventLog, response_id: str) -> list[Event]:
    """The events that belong to one response (by response_id or response.id)."""
    out = []
    for e in log.events:
        rid = e.get("response_id")
        if rid is None and isinstance(e.get("response"), dict):
            rid = e["response"].get("id")
        if rid == response_id:
            out.append(e)
    return out


def finished(done: Event, limit: int = MAX_TOKENS) -> bool:
    """The response of `done` (response.done) ran to its end: `completed`,
    or `incomplete` for max_output_tokens with exactly `limit` tokens out
    (the tiny model's noise often runs to the token limit)."""
    response = done["response"]
    if response["status"] == "incomplete":
        details = response.get("status_details") or {}
        return bool(
            details.get("reason") == "max_output_tokens"
            and response["usage"]["output_tokens"] == limit
        )
    return bool(response["status"] == "completed")


def check_response(log: EventLog, done: Event, *, modality: str) -> Event:
    """The GA event sequence of one finished response: created, output item
    added/done, content part added/done, text (or audio + transcript) deltas
    and done, response.done; the same ids throughout. The assistant item."""
    response = done["response"]
    rid = response["id"]
    events = response_events(log, rid)
    kinds = [e["type"] for e in events]
    assert kinds[0] == "response.created" and kinds[-1] == "response.done", kinds
    assert kinds.count("response.created") == 1 and kinds.count("response.done") == 1, kinds
    added = next(e for e in events if e["type"] == "response.output_item.added")
    item: Event = added["item"]
    assert item["type"] == "message" and item["role"] == "assistant", item
    item_id = item["id"]
    assert item_id, item
    part = "output_text" if modality == "text" else "output_audio"
    for kind in (
        "response.output_item.added",
        "response.content_part.added",
        f"response.{part}.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert kind in kinds, f"{kind} missing in {kinds}"
    for e in events:
        if "item_id" in e:
            assert e["item_id"] == item_id, (e["type"], e["item_id"], item_id)
        if "output_index" in e:
            assert e["output_index"] == 0, e
    order = [
        kinds.index(k)
        for k in (
            "response.created",
            "response.output_item.added",
            "response.content_part.added",
            f"response.{part}.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.done",
        )
    ]
    assert order == sorted(order), kinds
    if modality == "audio":
        assert "response.output_audio_transcript.done" in kinds, kinds
        assert "response.output_text.delta" not in kinds, kinds
    else:
        assert not [k for k in kinds if k.startswith("response.output_audio")], kinds
    outputs = response.get("output") or []
    assert [o["id"] for o in outputs] == [item_id], outputs
    return item


# ------------------------------------------------------------------ the SDK


@asynccontextmanager
async def realtime(app: WebSocketServerApp, key: str = KEY) -> AsyncIterator[tuple[Any, EventLog]]:
    """The official SDK's connection (`client.realtime.connect(model=...)`)
    and its event log, after session.created."""
    async with (
        sdk(app, key).realtime.connect(model=MODEL) as conn,
        EventLog(conn.recv_bytes) as log,
    ):
        await log.wait("session.created")
        yield conn, log


async def update_session(conn: Any, log: EventLog, **session: Any) -> Event:
    """session.update with `session` (type realtime); its session.updated."""
    n = len(log.of("session.updated"))
    await conn.send({"type": "session.update", "session": {"type": "realtime", **session}})
    return await log.wait("session.updated", n + 1)


async def say(conn: Any, log: EventLog, text: str) -> Event:
    """A typed user message (conversation.item.create, input_text): its
    conversation.item.added."""
    n = len(log.of("conversation.item.added"))
    await conn.send(
        {
            "type": "conversation.item.create",
            "item": {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": text}],
            },
        }
    )
    return await log.wait("conversation.item.added", n + 1)


async def respond(conn: Any, log: EventLog, **response: Any) -> Event:
    """response.create (with `response` fields); its response.done."""
    n = len(log.of("response.done"))
    event: Event = {"type": "response.create"}
    if response:
        event["response"] = response
    await conn.send(event)
    return await log.wait("response.done", n + 1)
