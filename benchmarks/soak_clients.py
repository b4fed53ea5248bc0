"""The soak's WebSocket clients (benchmarks/soak.py): speech streamed at real
time, typed turns, conversations resumed by session_id after a close or a
dropped connection, clients that vanish mid-reply and clients that never read.

Every well-behaved connection lives for a handful of turns and then closes
(so the clients' own event lists stay small over an hour) and the client
connects again; its turns go in the ledger through a Tracker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from benchmarks.soak_ledger import Ledger, Turn
from voice_agent.client import RealtimeClient
from voice_agent.protocol import (
    ErrorEvent,
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SpeechStoppedEvent,
)

FRAME_BYTES = 640  # 20 ms at 16 kHz mono PCM16
TEXTS = [
    "Turn on the kitchen light, please.",
    "What is the weather like tomorrow?",
    "Set a timer for ten minutes.",
    "Tell me a short story about a lighthouse.",
    "How far is the moon?",
    "Play some quiet music in the living room.",
]


@dataclass
class Context:
    url: str
    ledger: Ledger
    recordings: list[bytes]  # 16 kHz mono PCM16
    turn_timeout: float
    think_s: float = 30.0  # mean pause after a reply before the next turn
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    rng: random.Random = field(default_factory=lambda: random.Random(22))

    async def think(self) -> None:
        """A user's pause between turns: 0.5 to 1.5 times think_s."""
        await self.pause(0.5 * self.think_s, 1.5 * self.think_s)

    async def pause(self, lo: float, hi: float) -> None:
        """A think time (returns early when the soak is stopping)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), self.rng.uniform(lo, hi))


class Tracker:
    """One connection's turns, from its events (RealtimeClient on_event)."""

    def __init__(self, ledger: Ledger, kind: str, client: str) -> None:
        self.ledger, self.kind, self.client = ledger, kind, client
        self.utterances: dict[str, Turn] = {}
        self.texts: deque[Turn] = deque()
        self.replies: dict[str, Turn] = {}
        # utterances joined to a later one before their own reply began (a
        # continuation: speech.stopped `continues`): answered with its reply
        self.riders: dict[str, list[Turn]] = {}
        self.audio_open: set[str] = set()
        self.stopped = 0
        self.last_reply = 0  # the number of the last reply id seen (r7 -> 7)
        self.changed = asyncio.Event()

    def text_sent(self) -> None:
        self.texts.append(self.ledger.begin(self.kind, self.client))

    def on_event(self, e: ServerEvent) -> None:
        if isinstance(e, SpeechStoppedEvent):
            self.stopped += 1
            self.utterances[e.utterance_id] = self.ledger.begin(self.kind, self.client)
            earlier = self.utterances.pop(e.continues, None) if e.continues else None
            if earlier is not None:
                riders = [earlier, *self.riders.pop(e.continues or "", [])]
                self.riders.setdefault(e.utterance_id, []).extend(riders)
        elif isinstance(e, ReplyStarted):
            turn = None
            if e.utterance_id is not None:
                turn = self.utterances.pop(e.utterance_id, None)
                if e.utterance_id in self.riders:
                    self.riders[e.reply_id] = self.riders.pop(e.utterance_id)
            elif self.texts:
                turn = self.texts.popleft()
            self.replies[e.reply_id] = turn or self.ledger.begin(self.kind, self.client)
            with contextlib.suppress(ValueError):
                self.last_reply = max(self.last_reply, int(e.reply_id.lstrip("r")))
        elif isinstance(e, ReplyDone):
            self.ledger.timed(e.timing)
            self._end_reply(e.reply_id, "answered")
        elif isinstance(e, ReplyCancelled):
            self._end_reply(e.reply_id, f"cancelled:{e.reason}")
        elif isinstance(e, ErrorEvent):
            if e.reply_id and e.reply_id in self.replies:
                self._end_reply(e.reply_id, f"error:{e.code}")
                self.changed.set()
                return
            if e.code != "busy" or not (self.texts or self.utterances):
                self.ledger.error(e.code)
            elif self.texts:  # a refused turn: the oldest waiting one
                self.ledger.end(self.texts.popleft(), "error:busy")
            else:
                uid = next(iter(self.utterances))
                self.ledger.end(self.utterances.pop(uid), "error:busy")
                for rider in self.riders.pop(uid, []):
                    self.ledger.end(rider, "error:busy")
        elif isinstance(e, ReplyAudioStarted):
            self.audio_open.add(e.reply_id)
        elif isinstance(e, ReplyAudioDone):
            self.audio_open.discard(e.reply_id)
        self.changed.set()

    def _end_reply(self, reply_id: str, outcome: str) -> None:
        turn = self.replies.pop(reply_id, None)
        if turn is not None:
            self.ledger.end(turn, outcome)
        for rider in self.riders.pop(reply_id, []):
            self.ledger.end(rider, outcome)

    def stopped_since(self, before: int) -> Callable[[], bool]:
        """A test: a speech.stopped has come since the count was `before`."""
        return lambda: self.stopped > before

    def idle(self) -> bool:
        return not (self.utterances or self.texts or self.replies or self.audio_open)

    async def wait(self, done: Callable[[], bool], timeout: float, client: RealtimeClient) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            left = deadline - time.monotonic()
            if left <= 0 or client.ended:
                return done()
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 1.0))
        return True

    def fail_all(self, outcome: str) -> None:
        riders = [turn for turns in self.riders.values() for turn in turns]
        for turn in [*self.utterances.values(), *self.texts, *self.replies.values(), *riders]:
            self.ledger.end(turn, outcome)
        self.riders.clear()
        self.utterances.clear()
        self.texts.clear()
        self.replies.clear()
        self.audio_open.clear()


class Mic:
    """Sends 20 ms frames at real-time pace: queued speech, else silence."""

    def __init__(self, client: RealtimeClient) -> None:
        self.client = client
        self.frames: deque[bytes] = deque()
        self.task = asyncio.create_task(self._run())

    def say(self, pcm: bytes) -> float:
        """Queue `pcm`; seconds until its last frame is sent."""
        for i in range(0, len(pcm) - FRAME_BYTES + 1, FRAME_BYTES):
            self.frames.append(pcm[i : i + FRAME_BYTES])
        return len(self.frames) * 0.02

    async def _run(self) -> None:
        silence = bytes(FRAME_BYTES)
        t0, k = time.monotonic(), 0
        with contextlib.suppress(Exception):
            while True:
                due = t0 + k * 0.02
                now = time.monotonic()
                if now < due:
                    await asyncio.sleep(due - now)
                elif now - due > 1.0:  # this process fell behind: no burst
                    t0, k = now, 0
                await self.client.send_audio(self.frames.popleft() if self.frames else silence)
                k += 1

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def open_session(
    ctx: Context, tracker: Tracker | None, session_id: str | None = None
) -> tuple[RealtimeClient, str]:
    client = RealtimeClient(
        ctx.url, on_event=None if tracker is None else tracker.on_event, open_timeout=30
    )
    await client.connect()
    started = await client.start(timeout=60, speak=True, session_id=session_id)
    return client, started.session_id


async def finish(
    ctx: Context, client: RealtimeClient, tracker: Tracker, who: str, dropped: bool = False
) -> None:
    if client.ended and not dropped:  # the connection ended under us: why
        ctx.ledger.closed(client.close_code, who, close_cause(client.ws))
        tracker.fail_all(f"closed:{client.close_code}")
    with contextlib.suppress(Exception):
        await asyncio.wait_for(client.close(), 10)


def close_cause(ws: ClientConnection) -> str:
    """Who ended a connection and why, from the close frames sent and
    received (1006 alone cannot tell a server's drop from our own keepalive
    giving up on a server that did not answer in time)."""
    sent, rcvd = ws.protocol.close_sent, ws.protocol.close_rcvd
    if rcvd is not None and (sent is None or ws.protocol.close_rcvd_then_sent):
        return f"server closed {rcvd.code} {rcvd.reason}".strip()
    if sent is not None:
        return f"client closed {sent.code} {sent.reason}".strip()
    return "connection dropped without a close frame"


async def speech_client(ctx: Context, name: str) -> None:
    """Streams recordings at real time (a mic: silence in between), waits for
    each reply and its audio; 4 to 8 recordings per connection."""
    while not ctx.stopping.is_set():
        tracker = Tracker(ctx.ledger, "speech", name)
        try:
            client, _ = await open_session(ctx, tracker)
        except Exception as exc:
            ctx.ledger.notes[f"speech connect failed: {type(exc).__name__}"] += 1
            await ctx.pause(2, 4)
            continue
        mic = Mic(client)
        try:
            for _ in range(ctx.rng.randint(4, 8)):
                if ctx.stopping.is_set() or client.ended:
                    break
                before, spoke_at = tracker.stopped, ctx.ledger.now()
                spoken = mic.say(ctx.rng.choice(ctx.recordings))
                await asyncio.sleep(spoken)
                heard = await tracker.wait(tracker.stopped_since(before), 15, client)
                if not heard and not client.ended:
                    lost = ctx.ledger.begin("speech", name, spoke_at)
                    ctx.ledger.end(lost, "no_speech_stopped")
                await asyncio.sleep(1.0)  # a second pause closes what is still open
                if not await tracker.wait(tracker.idle, ctx.turn_timeout, client):
                    tracker.fail_all("timeout")
                    break
                await ctx.think()
        finally:
            await mic.stop()
            await finish(ctx, client, tracker, "speech")


async def typed_client(ctx: Context, name: str, kind: str = "text") -> None:
    """Typed turns, each reply read and its audio waited for; with kind
    'resume' the connection then closes (clean or dropped) and the next one
    resumes the conversation by session_id."""
    session_id: str | None = None
    last_reply = 0
    drop = False
    while not ctx.stopping.is_set():
        tracker = Tracker(ctx.ledger, kind, name)
        try:
            client, got = await open_session(ctx, tracker, session_id if kind == "resume" else None)
        except Exception as exc:
            ctx.ledger.notes[f"{kind} connect failed: {type(exc).__name__}"] += 1
            await ctx.pause(2, 4)
            continue
        first_check = kind == "resume" and session_id is not None
        if first_check:
            how = "after_drop" if drop else "after_close"
            first_check = got == session_id  # then the reply ids must go on too
            detail = {"client": name, "wanted": session_id, "got": got}
            ctx.ledger.resume(first_check, how, detail)
            if not first_check:
                last_reply = 0
        session_id, drop = got, False
        try:
            for _ in range(ctx.rng.randint(2, 5) if kind == "resume" else ctx.rng.randint(5, 10)):
                if ctx.stopping.is_set() or client.ended:
                    break
                tracker.text_sent()
                await client.send_text(ctx.rng.choice(TEXTS))
                if not await tracker.wait(tracker.idle, ctx.turn_timeout, client):
                    tracker.fail_all("timeout")
                    break
                if first_check and tracker.last_reply:
                    first_check = False
                    if tracker.last_reply <= last_reply:  # the ids started again: a new history
                        ids = {"client": name, "last": last_reply, "now": tracker.last_reply}
                        ctx.ledger.resume(False, "history", ids)
                await ctx.think()
            last_reply = max(last_reply, tracker.last_reply)
            drop = kind == "resume" and ctx.rng.random() < 0.5
            if drop and not client.ended:
                client.ws.transport.abort()  # the network went away
        finally:
            await finish(ctx, client, tracker, kind, dropped=drop)
        await ctx.pause(0.5, 2)


async def vanishing_client(ctx: Context, name: str) -> None:
    """Asks, and drops the connection once the reply has begun (its text or
    its audio); then comes back, resuming the conversation."""
    session_id: str | None = None
    while not ctx.stopping.is_set():
        try:
            client, got = await open_session(ctx, None, session_id)
        except Exception as exc:
            ctx.ledger.notes[f"vanish connect failed: {type(exc).__name__}"] += 1
            await ctx.pause(2, 4)
            continue
        if session_id is not None:
            ok = got == session_id
            ctx.ledger.resume(
                ok, "after_vanish", {"client": name, "wanted": session_id, "got": got}
            )
        session_id = got
        try:
            await client.send_text(ctx.rng.choice(TEXTS))
            kind = ReplyAudioStarted if ctx.rng.random() < 0.5 else ReplyDelta
            await client.wait_for(kind, ctx.turn_timeout)
            await asyncio.sleep(ctx.rng.uniform(0, 0.5))
            ctx.ledger.misbehaving["vanished_mid_reply"] += 1
        except Exception as exc:
            ctx.ledger.misbehaving[f"vanish: {type(exc).__name__}"] += 1
        finally:
            with contextlib.suppress(Exception):
                client.ws.transport.abort()
                await asyncio.wait_for(client.close(), 5)
        await ctx.think()


async def never_reading_client(ctx: Context, name: str) -> None:
    """Starts a spoken session and asks every think time, never reading a
    byte of what comes back, for 30 to 90 s; then drops the connection."""
    while not ctx.stopping.is_set():
        start = json.dumps({"type": "session.start", "sample_rate": 16000, "speak": True})
        try:
            ws = await ws_connect(ctx.url, open_timeout=30, max_queue=4)
        except Exception as exc:
            ctx.ledger.notes[f"never-read connect failed: {type(exc).__name__}"] += 1
            await ctx.pause(2, 4)
            continue
        deadline = time.monotonic() + ctx.rng.uniform(30, 90)
        try:
            await ws.send(start)
            while time.monotonic() < deadline and not ctx.stopping.is_set():
                text = json.dumps({"type": "text", "text": ctx.rng.choice(TEXTS)})
                await asyncio.wait_for(ws.send(text), 10)
                ctx.ledger.misbehaving["never_read_asks"] += 1
                await ctx.think()
            ctx.ledger.misbehaving["never_read_sessions"] += 1
        except Exception as exc:
            ctx.ledger.misbehaving[f"never_read ended: {type(exc).__name__}"] += 1
        finally:
            if ws.close_code is not None:
                ctx.ledger.closed(ws.close_code, "never_read", close_cause(ws))
            ws.transport.abort()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.wait_closed(), 5)
        await ctx.pause(1, 3)
