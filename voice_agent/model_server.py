"""`voice-agent serve-model`: the project's engine behind the OpenAI chat-completions API.

POST /v1/chat/completions (server-sent events with `stream: true`, one JSON
reply without) and GET /v1/models, the subset of the API that vLLM serves for
Qwen2-Audio and engine/openai.py speaks: user content is a string or parts
`{"type": "text"}` and `{"type": "input_audio", "input_audio": {"data":
<base64 WAV/FLAC/OGG>, "format": ...}}`. Each request carries the whole
conversation; it is rebuilt in the engine (a new conversation per request: no
KV reuse across requests, the history is prefilled again), the last user
message is the new turn. A client that disconnects mid-stream cancels its turn.
Sampling (temperature, top_p) is the engine's, set at start; `max_tokens`
(or `max_completion_tokens`) caps a reply below --max-new-tokens.

GET /health answers 200 while the engine is ready (`engine.ready()` within a
few seconds) and 503 otherwise, with no API key needed: the probe of vLLM's
OpenAI server, so one Kubernetes manifest (deploy/k8s/model-deployment.yaml)
fits both. The port opens once the model is loaded.

GET /v1/models marks a model written by `make-tiny-model` (random weights)
with `"voice_agent_demo_model": true` in its entry.

Errors are OpenAI-style JSON: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import itertools
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from aiohttp import web

from voice_agent.audio import decode, split_clips
from voice_agent.engine import defaults, prompt
from voice_agent.engine.base import AudioArray, Engine, History, TurnInput, TurnResult
from voice_agent.engine.tiny import DEMO_MODEL_KEY
from voice_agent.errors import BadAudio, Busy, VoiceAgentError

logger = logging.getLogger("voice_agent.model_server")

MAX_BODY_BYTES = 64 * 1024 * 1024  # a long conversation re-sends all its audio
HEALTH_TIMEOUT = 5.0  # seconds GET /health waits for engine.ready()
HEALTH_PATH = "/health"  # vLLM's; probes send no API key


class ApiError(Exception):
    """An OpenAI-style error reply."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )

    def response(self) -> web.Response:
        return web.json_response(
            error_body(self.message, self.type, self.code, self.param), status=self.status
        )


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", "invalid_request", param)


@dataclass
class ParsedRequest:
    """A chat request turned into the engine's terms."""

    system_prompt: str | None
    history: list[dict[str, Any]]  # ChatML messages before the new turn
    clips: list[AudioArray]  # the history's clips, "clip-1", ... in order
    turns: int
    turn: TurnInput
    stream: bool
    include_usage: bool
    max_tokens: int | None
    model: str = ""


def _audio(part: dict[str, Any]) -> AudioArray:
    spec = part.get("input_audio")
    if not isinstance(spec, dict) or not isinstance(spec.get("data"), str):
        raise _bad("input_audio needs {'data': base64, 'format': ...}", "messages")
    try:
        raw = base64.b64decode(spec["data"], validate=True)
    except (binascii.Error, ValueError):
        raise _bad("input_audio data is not base64", "messages") from None
    try:
        return decode(raw)
    except BadAudio as exc:
        raise _bad(str(exc), "messages") from None


def _parts(content: Any) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise _bad("content must be a string or a list of parts", "messages")
    for p in content:
        if p.get("type") == "text" and not isinstance(p.get("text"), str):
            raise _bad("a text part needs a string 'text'", "messages")
        if p.get("type") not in ("text", "input_audio"):
            raise _bad(f"unsupported content part type {str(p.get('type'))[:40]!r}", "messages")
    return content


def parse_request(body: Any, max_new_tokens: int) -> ParsedRequest:
    """Validate a chat-completions body (raises ApiError 400)."""
    if not isinstance(body, dict):
        raise _bad("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("'model' is required", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("'messages' must be a non-empty list", "messages")
    if not all(isinstance(m, dict) for m in messages):
        raise _bad("each message must be an object", "messages")
    system_prompt = None
    if messages[0].get("role") == "system":
        content = messages[0].get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in _parts(content))
        if not isinstance(content, str):
            raise _bad("the system message needs text content", "messages")
        system_prompt = content
        messages = messages[1:]
    if not messages or messages[-1].get("role") != "user":
        raise _bad("the last message must be the user's", "messages")

    history: list[dict[str, Any]] = []
    if system_prompt is not None:
        history.append({"role": "system", "content": system_prompt})
    clips: list[AudioArray] = []
    turns = 0
    for m in messages[:-1]:
        role = m.get("role")
        parts = _parts(m.get("content"))
        if role in ("assistant", "system"):  # system: an instruction added later on
            text = "".join(p.get("text", "") for p in parts if p.get("type") == "text")
            history.append({"role": role, "content": text})
            turns += role == "assistant"
        elif role == "user":
            items: list[dict[str, str]] = []
            for p in parts:
                if p["type"] == "text":
                    items.append(prompt.text_item(p["text"]))
                    continue
                for clip in split_clips(_audio(p)):
                    clips.append(clip)
                    items.append(prompt.audio_item(len(clips)))
            history.append(prompt.user_content(items))
        else:
            raise _bad(f"unsupported role {str(role)[:20]!r}", "messages")

    last = _parts(messages[-1].get("content"))
    audio = [_audio(p) for p in last if p["type"] == "input_audio"]
    text = "".join(p["text"] for p in last if p["type"] == "text")
    if not audio and not text:
        raise _bad("the last user message has no text or audio", "messages")
    turn = TurnInput(audio=np.concatenate(audio) if audio else None, text=text or None)

    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise _bad("max_tokens must be a positive integer", "max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("'stream' must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise _bad("'stream_options' must be an object", "stream_options")
    return ParsedRequest(
        system_prompt=system_prompt,
        history=history,
        clips=clips,
        turns=turns,
        turn=turn,
        stream=stream,
        include_usage=bool(options.get("include_usage", False)),
        max_tokens=min(limit, max_new_tokens) if limit is not None else None,
        model=model,
    )


class ModelServer:
    """The HTTP app around one started engine."""

    def __init__(
        self,
        engine: Engine,
        *,
        served_name: str | None = None,
        api_key: str | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        """`max_new_tokens`: the cap on a reply (default: the engine's own)."""
        self.engine = engine
        self.served_name = served_name or engine.model_name
        self._api_key = api_key
        default = int(getattr(engine, "max_new_tokens", defaults.MAX_NEW_TOKENS))
        self.max_new_tokens = max_new_tokens or default
        self.created = int(time.time())
        self.stats: dict[str, int] = {
            "requests": 0,
            "completed": 0,
            "cancelled": 0,
            "errors": 0,
        }
        self._ids = itertools.count(1)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES, middlewares=[self._errors])
        app.router.add_get(HEALTH_PATH, self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            if self._api_key is not None and request.path != HEALTH_PATH:
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self._api_key}".encode()):
                    raise ApiError(
                        401, "missing or wrong API key", "authentication_error", "invalid_api_key"
                    )
            response: web.StreamResponse = await handler(request)
            return response
        except ApiError as exc:
            return exc.response()
        except web.HTTPException as exc:
            kind = "not_found_error" if exc.status == 404 else "invalid_request_error"
            return web.json_response(error_body(exc.reason, kind), status=exc.status)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            logger.exception("chat request failed")
            body = error_body("internal server error", "server_error")
            return web.json_response(body, status=500)

    async def health(self, request: web.Request) -> web.Response:
        """200 while the engine answers `ready()`, 503 otherwise (or too slow)."""
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                ready = await self.engine.ready()
        except TimeoutError:
            ready = False
        except Exception:
            logger.exception("engine.ready() failed")
            ready = False
        if ready:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="engine not ready\n")

    async def models(self, request: web.Request) -> web.Response:
        entry = {
            "id": self.served_name,
            "object": "model",
            "created": self.created,
            "owned_by": "voice-agent",
        }
        if self.engine.demo_model:  # random weights (make-tiny-model): replies are noise
            entry[DEMO_MODEL_KEY] = True
        return web.json_response({"object": "list", "data": [entry]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self.stats["requests"] += 1
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise _bad("the body is not JSON") from None
        # Decoding the audio of a long history takes a while: off the event loop.
        parsed = await asyncio.to_thread(parse_request, body, self.max_new_tokens)
        if parsed.model != self.served_name:
            raise ApiError(
                404,
                f"the model {parsed.model[:100]!r} does not exist",
                "NotFoundError",
                "model_not_found",
                "model",
            )
        conversation = await self._conversation(parsed)
        try:
            handle = self.engine.submit(conversation, parsed.turn, parsed.max_tokens)
        except Busy:
            self.engine.release(conversation)
            raise ApiError(
                429, "the engine is busy, try again", "rate_limit_error", "busy"
            ) from None
        except VoiceAgentError as exc:
            self.engine.release(conversation)
            message = str(exc) or "the engine failed"
            raise ApiError(503, message, "server_error", exc.code) from None
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        try:
            if parsed.stream:
                return await self._stream(request, handle, parsed, cid)
            text = "".join([d.text async for d in handle])
            result = handle.result
        except VoiceAgentError as exc:
            self.stats["errors"] += 1
            raise ApiError(500, str(exc) or "the model failed", "server_error", exc.code) from None
        except asyncio.CancelledError:  # the client went away: stop decoding
            if not parsed.stream:
                handle.cancel()
                self.stats["cancelled"] += 1
            raise
        finally:
            self.engine.release(conversation)
        self.stats["completed"] += 1
        return web.json_response(
            {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self.served_name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": self._finish_reason(result, parsed),
                    }
                ],
                "usage": _usage(result),
            }
        )

    async def _conversation(self, parsed: ParsedRequest) -> Any:
        cid = f"http-{next(self._ids)}"
        if not parsed.turns and len(parsed.clips) == 0:
            return self.engine.new_conversation(parsed.system_prompt, cid)
        build = getattr(self.engine, "history_from_messages", None)
        try:
            if build is not None:
                history = await asyncio.to_thread(build, parsed.history, parsed.clips, parsed.turns)
            else:
                history = History(messages=parsed.history, turns=parsed.turns)
            return self.engine.restore(cid, parsed.system_prompt, history)
        except (ValueError, NotImplementedError) as exc:
            logger.info("cannot rebuild the conversation: %s", type(exc).__name__)
            raise _bad("the conversation cannot be rebuilt", "messages") from None

    def _finish_reason(self, result: TurnResult, parsed: ParsedRequest) -> str:
        limit = parsed.max_tokens or self.max_new_tokens
        return "length" if result.usage.completion_tokens >= limit else "stop"

    async def _stream(
        self, request: web.Request, handle: Any, parsed: ParsedRequest, cid: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "chat.completion.chunk",
                "created": created,
                "model": self.served_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        async def send(event: dict[str, Any] | str) -> None:
            data = event if isinstance(event, str) else json.dumps(event)
            await response.write(f"data: {data}\n\n".encode())

        finished = False
        try:
            await send(chunk({"role": "assistant", "content": ""}, None))
            try:
                async for delta in handle:
                    await send(chunk({"content": delta.text}, None))
            except VoiceAgentError as exc:
                self.stats["errors"] += 1
                finished = True
                await send(error_body(str(exc) or "the model failed", "server_error", exc.code))
                await send("[DONE]")
                return response
            result = handle.result
            finished = True
            await send(chunk({}, self._finish_reason(result, parsed)))
            if parsed.include_usage:
                await send({**chunk({}, None), "choices": [], "usage": _usage(result)})
            await send("[DONE]")
            await response.write_eof()
            self.stats["completed"] += 1
            return response
        finally:
            if not finished:  # the client went away mid-stream: stop decoding
                handle.cancel()
                self.stats["cancelled"] += 1
                logger.info("client closed the stream: turn cancelled")


def _usage(result: TurnResult) -> dict[str, Any]:
    u = result.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


@contextlib.asynccontextmanager
async def serving(
    engine: Engine,
    host: str = "127.0.0.1",
    port: int = 0,
    **kwargs: Any,
) -> AsyncIterator[tuple[ModelServer, int]]:
    """Start the engine and serve it; yields (server, bound port). Closes the
    HTTP side on exit (the engine is the caller's to close)."""
    await engine.start()
    server = ModelServer(engine, **kwargs)
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = port
    addresses = runner.addresses
    if addresses:
        bound = int(addresses[0][1])
    try:
        yield server, bound
    finally:
        await runner.cleanup()


async def serve_until_signal(engine: Engine, host: str, port: int, **kwargs: Any) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        async with serving(engine, host, port, **kwargs) as (server, bound):
            logger.info(
                "serving %s on http://%s:%d/v1 (chat completions, models)",
                server.served_name,
                host,
                bound,
            )
            await stop.wait()
    finally:
        await engine.close()
