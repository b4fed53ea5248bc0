"""A remote engine: the OpenAI chat-completions API with audio input (vLLM, serve-model).

Each conversation's history is kept here, client-side, as chat messages: user
turns as `input_audio` parts (base64 WAV, 16 kHz mono PCM16; audio longer than
30 s is split into several clips as the local engine does) and text parts,
assistant replies as text. Every turn POSTs the whole history with
`stream: true` and reads the server-sent events; each content piece is one
Delta (`Delta.tokens` counts pieces: vLLM sends one token per piece, so
`cancel(keep_tokens)` keeps that many pieces). Cancelling closes the HTTP
stream, which makes the server stop decoding.

Connect errors are retried a bounded number of times; a backend that stays
down, times out or answers with an error fails only that turn, with
errors.BackendUnavailable or EngineError. The API key is sent as a bearer token
and never logged. History edits apply to the client-side messages in order
with the turns (remote_history.py).

`demo_model` follows the backend's GET /models entry for the served model
(read at start, by every ready() probe and when the name is resolved):
serve-model marks a model written by make-tiny-model there.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import aiohttp

from voice_agent.engine import defaults
from voice_agent.engine.base import (
    Conversation,
    Delta,
    Engine,
    EngineStats,
    History,
    HistoryEdit,
    QueueTurnHandle,
    Timing,
    TurnHandle,
    TurnInput,
    TurnResult,
    Usage,
    edit_after,
    edit_future,
)
from voice_agent.engine.remote_history import RemoteState, apply_edit, user_message, wav_base64
from voice_agent.engine.tiny import DEMO_MODEL_KEY
from voice_agent.errors import BackendUnavailable, Busy, EngineError, VoiceAgentError

__all__ = ["OpenAIEngine", "user_message", "wav_base64"]

logger = logging.getLogger("voice_agent.engine")

# A backend on the same network answers a connect within milliseconds: 5 s
# means it is down or unreachable (and a retry may find it back).
CONNECT_TIMEOUT = 5.0
RETRY_DELAY = 0.5  # seconds before the first retry of a failed connect; doubles each time


@dataclass
class _Stream:
    """What one streamed reply has produced so far."""

    handle: QueueTurnHandle
    pieces: list[str] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    first: float = 0.0


class OpenAIEngine(Engine):
    """Chat completions over HTTP with audio input; one aiohttp session per engine."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        *,
        max_new_tokens: int = defaults.MAX_NEW_TOKENS,
        temperature: float = defaults.TEMPERATURE,
        top_p: float = defaults.TOP_P,
        max_queue: int = defaults.MAX_QUEUE,
        connect_timeout: float = CONNECT_TIMEOUT,
        read_timeout: float = defaults.ENGINE_TIMEOUT,
        retries: int = defaults.ENGINE_RETRIES,
        retry_delay: float = RETRY_DELAY,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`url`: the API base, e.g. http://host:8000/v1. `model`: the served
        model name (None: the first one GET /models lists). `retries`: extra
        attempts after a connect error, `retry_delay` seconds apart (doubling)."""
        self.base_url = url.rstrip("/")
        self.model_name = model or ""
        self._api_key = api_key
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.max_queue = max_queue
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = max(0, retries)
        self.retry_delay = retry_delay
        self.stats: dict[str, int] = {"requests": 0, "retries": 0, "failures": 0, "cancelled": 0}
        self._clock = clock
        self._sleep = sleep
        self._session: aiohttp.ClientSession | None = None
        self._unfinished = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._closed = False

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIEngine(url={self.base_url!r}, model={self.model_name!r})"

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._closed = False
        self._client()
        await self.ready(self.connect_timeout)  # the demo mark; a backend down now is not fatal

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.connect_timeout, sock_read=self.read_timeout
            )
            self._session = aiohttp.ClientSession(headers=headers, timeout=timeout)
        return self._session

    async def close(self) -> None:
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def runtime_stats(self) -> EngineStats:
        """This gateway's turns in flight on the backend (what it batches from
        here); the KV cache lives on the backend: 0."""
        return EngineStats(batch_size=self._unfinished)

    async def ready(self, timeout: float = 2.0) -> bool:
        """The backend answers GET /models with 200 within `timeout` seconds."""
        session = self._session
        if session is None or session.closed:  # not started, or closed
            return False
        try:
            async with session.get(
                f"{self.base_url}/models", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                if resp.status != 200:
                    return False
                self._note_models(await resp.json(content_type=None))
                return True
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return False

    def _note_models(self, data: Any) -> list[str]:
        """A GET /models body's ids; the served model's entry sets demo_model."""
        entries = data.get("data") if isinstance(data, dict) else None
        models = [m for m in entries or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        name = self.model_name or (models[0]["id"] if models else "")
        for entry in models:
            if entry["id"] == name:
                self.demo_model = entry.get(DEMO_MODEL_KEY) is True
        return [m["id"] for m in models]

    # -------------------------------------------------------- conversations

    def new_conversation(
        self, system_prompt: str | None = None, conversation_id: str | None = None
    ) -> Conversation:
        cid = conversation_id or f"remote-{next(self._ids)}"
        state = RemoteState()
        if system_prompt is not None:
            state.messages.append({"role": "system", "content": system_prompt})
        return Conversation(cid, system_prompt, state=state)

    def _state(self, conversation: Conversation) -> RemoteState:
        state = conversation.state
        if not isinstance(state, RemoteState):
            raise ValueError("conversation was not created by this engine")
        return state

    def messages(self, conversation: Conversation) -> list[dict[str, Any]]:
        """The conversation's history as the API takes it (what the next turn re-sends)."""
        return self._state(conversation).request_messages()

    def history_text(self, conversation: Conversation) -> str:
        lines = []
        for m in self._state(conversation).messages:
            content = m["content"]
            if isinstance(content, list):
                content = "".join(
                    "<audio>" if p.get("type") == "audio" else str(p.get("text", ""))
                    for p in content
                )
            lines.append(f"<|im_start|>{m['role']}\n{content}<|im_end|>\n")
        return "".join(lines)

    def submit(
        self, conversation: Conversation, turn: TurnInput, max_new_tokens: int | None = None
    ) -> TurnHandle:
        state = self._state(conversation)
        if self._unfinished >= self.max_queue:
            raise Busy("the engine is busy, try again")
        self._unfinished += 1
        handle = QueueTurnHandle(asyncio.get_running_loop())
        limit = max(1, self.max_new_tokens if max_new_tokens is None else max_new_tokens)
        seq = state.turn_log.submit()
        task = asyncio.create_task(
            self._run(conversation, state, turn, handle, state.last, limit, self._clock(), seq)
        )
        state.last = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    def edit_history(self, conversation: Conversation, edit: HistoryEdit) -> asyncio.Future[bool]:
        state = self._state(conversation)
        future = edit_future()
        if self._closed:
            future.set_exception(EngineError("the engine is closed"))
            return future
        upto = state.turn_log.submitted
        task = asyncio.create_task(
            edit_after(state.last, future, partial(apply_edit, conversation, state, edit, upto))
        )
        state.last = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    # ----------------------------------------------------------------- turn

    async def _run(
        self,
        conversation: Conversation,
        state: RemoteState,
        turn: TurnInput,
        handle: QueueTurnHandle,
        previous: asyncio.Task[None] | None,
        limit: int,
        submitted: float,
        seq: int,
    ) -> None:
        stream: asyncio.Task[None] | None = None
        entered = False  # whether the turn entered the history
        try:
            if previous is not None:
                await asyncio.gather(previous, return_exceptions=True)
            started = self._clock()
            if handle.cancel_requested:
                handle.push(TurnResult("", Usage(), Timing(), cancelled=True))
                return
            message, clips = user_message(turn, len(state.clips))
            out = _Stream(handle)
            request = state.request_messages([message], clips)
            stream = asyncio.create_task(self._stream(request, limit, out))
            task = stream

            def close_stream() -> None:
                task.cancel()

            handle.on_cancel = close_stream
            await asyncio.wait([stream])
            cancelled = stream.cancelled() or handle.cancel_requested
            exc = None if stream.cancelled() else stream.exception()
            if exc is not None:
                self.stats["failures"] += 1
                if not isinstance(exc, VoiceAgentError):
                    logger.warning("remote turn failed: %s", type(exc).__name__)
                    exc = EngineError("the model failed on this turn")
                handle.push(exc)
                return
            keep = len(out.pieces)
            if cancelled:
                self.stats["cancelled"] += 1
                if handle.keep_tokens is not None:
                    keep = min(keep, handle.keep_tokens)
            text = "".join(out.pieces[:keep])
            state.messages += [message, {"role": "assistant", "content": text}]
            state.pieces = out.pieces[:keep]
            state.clips += clips
            conversation.turns += 1
            conversation.audio_clips = len(state.clips)
            entered = True
            usage = out.usage or {}
            details = usage.get("prompt_tokens_details") or {}
            now = self._clock()
            handle.push(
                TurnResult(
                    text,
                    Usage(
                        prompt_tokens=int(usage.get("prompt_tokens") or 0),
                        cached_tokens=int(details.get("cached_tokens") or 0),
                        completion_tokens=int(usage.get("completion_tokens") or len(out.pieces)),
                    ),
                    Timing(
                        queue_ms=(started - submitted) * 1000.0,
                        ttft_ms=((out.first or now) - submitted) * 1000.0,
                        total_ms=(now - submitted) * 1000.0,
                    ),
                    cancelled=cancelled,
                )
            )
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()
            handle.push(TurnResult("", Usage(), Timing(), cancelled=True))
            raise
        except Exception:
            logger.exception("remote turn failed")
            handle.push(EngineError("the model failed on this turn"))
        finally:
            self._unfinished -= 1
            state.turn_log.note(seq, entered)

    async def _resolve_model(self) -> str:
        if self.model_name:
            return self.model_name
        async with self._client().get(f"{self.base_url}/models") as resp:
            if resp.status != 200:
                raise EngineError(f"the model backend answered HTTP {resp.status} to /models")
            data = await resp.json()
        models = self._note_models(data)
        if not models:
            raise EngineError("the model backend serves no model")
        self.model_name = models[0]
        return self.model_name

    async def _stream(self, messages: list[dict[str, Any]], limit: int, out: _Stream) -> None:
        """POST one turn (retrying connect errors) and read its SSE stream into `out`."""
        delay = self.retry_delay
        for attempt in range(self.retries + 1):
            try:
                model = await self._resolve_model()
                body = {
                    "model": model,
                    "messages": messages,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                    "max_tokens": limit,
                    "temperature": self.temperature,
                    "top_p": self.top_p,
                }
                self.stats["requests"] += 1
                async with self._client().post(
                    f"{self.base_url}/chat/completions", json=body
                ) as resp:
                    if resp.status != 200:
                        await self._refused(resp)
                    await self._read_events(resp, out)
                return
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                if attempt >= self.retries:
                    logger.warning(
                        "model backend %s unreachable after %d attempts: %s",
                        self.base_url,
                        attempt + 1,
                        type(exc).__name__,
                    )
                    raise BackendUnavailable("the model backend is unreachable") from None
                self.stats["retries"] += 1
                await self._sleep(delay)
                delay *= 2
            except (TimeoutError, aiohttp.ServerTimeoutError):
                logger.warning("model backend %s timed out", self.base_url)
                raise BackendUnavailable("the model backend timed out") from None
            except aiohttp.ClientError as exc:
                logger.warning("model backend %s failed: %s", self.base_url, type(exc).__name__)
                raise BackendUnavailable("the model backend closed the connection") from None

    async def _refused(self, resp: aiohttp.ClientResponse) -> None:
        detail = ""
        try:
            error = (await resp.json(content_type=None)).get("error") or {}
            detail = str(error.get("message", ""))[:200]
        except (ValueError, AttributeError, aiohttp.ClientError):
            pass
        logger.warning("model backend answered HTTP %d: %s", resp.status, detail)
        if resp.status in (429, 503):
            raise Busy("the model backend is busy, try again")
        raise EngineError(f"the model backend refused the turn (HTTP {resp.status})")

    async def _read_events(self, resp: aiohttp.ClientResponse, out: _Stream) -> None:
        complete = False
        try:
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, comments, event: lines
                data = line[5:].strip()
                if data == "[DONE]":
                    complete = True
                    return
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise EngineError("the model backend sent a malformed event") from None
                if not isinstance(chunk, dict):
                    raise EngineError("the model backend sent a malformed event")
                if chunk.get("error") or chunk.get("object") == "error":
                    raise EngineError("the model backend failed on this turn")
                if chunk.get("usage"):
                    out.usage = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content")
                    if piece:
                        if not out.first:
                            out.first = self._clock()
                        out.pieces.append(piece)
                        out.handle.push(Delta(piece, len(out.pieces)))
            raise BackendUnavailable("the model backend ended the reply early")
        finally:
            if complete:
                resp.release()  # the connection goes back to the pool
            else:
                resp.close()  # an unfinished stream closes the connection: the server stops

    # -------------------------------------------------------------- storage

    def snapshot(self, conversation: Conversation) -> History | None:
        """The history in the shared format (audio as "clip-N" items plus the
        clips), so the store keeps audio only with --store-audio."""
        state = self._state(conversation)
        if state.last is not None and not state.last.done():
            return None
        return History(
            messages=[dict(m) for m in state.messages],
            clips=list(state.clips),
            turns=conversation.turns,
        )

    def restore(
        self, conversation_id: str, system_prompt: str | None, history: History
    ) -> Conversation:
        """A conversation from any engine's snapshot (its ids are not needed)."""
        conversation = self.new_conversation(system_prompt, conversation_id)
        state = self._state(conversation)
        if history.messages:
            state.messages = [dict(m) for m in history.messages]
        state.clips = list(history.clips)
        conversation.turns = history.turns
        conversation.audio_clips = len(state.clips)
        return conversation
