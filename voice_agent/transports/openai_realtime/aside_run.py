"""Running an Aside (aside.py) on the engine, beside the conversation: a
throwaway engine conversation, its messages appended, its turn submitted;
the deltas and the end go through the translator as the native events of
the aside's reply id, and its GA events to `put`."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import asdict

from voice_agent.engine.base import Engine, TurnHandle
from voice_agent.errors import WireError
from voice_agent.protocol import ErrorEvent, ReplyCancelled, ReplyDelta, ReplyDone
from voice_agent.transports.openai_realtime.calls import Aside, Out
from voice_agent.transports.openai_realtime.translator import Translator


async def run_aside(
    engine: Engine,
    call: Aside,
    t: Translator,
    put: Callable[[Sequence[Out]], None],
    handles: dict[str, TurnHandle],
    *,
    conversation_id: str,
    report: Callable[[BaseException], WireError],
) -> None:
    """Run `call` to its end; `handles` holds its handle while it runs (for
    response.cancel). Cancelled (the connection ends): the turn is cancelled."""
    reply_id = call.reply_id
    conversation = engine.new_conversation(call.system_prompt, conversation_id=conversation_id)
    handle: TurnHandle | None = None
    put(t.aside_started(reply_id))
    try:
        for message in call.messages:
            engine.edit_history(conversation, message)  # (in order, before the turn)
        handle = engine.submit(conversation, call.turn, call.max_output_tokens)
        handles[reply_id] = handle
        async for delta in handle:
            if delta.text:
                put(t.server(ReplyDelta(reply_id, delta.text)))
        result = handle.result
        if result.cancelled:
            put(t.server(ReplyCancelled(reply_id, "client", result.text)))
        else:
            put(t.server(ReplyDone(reply_id, result.text, asdict(result.usage), {})))
    except asyncio.CancelledError:
        if handle is not None:
            handle.cancel()
        raise
    except Exception as exc:
        wire = report(exc)
        put(t.server(ErrorEvent(wire.code, wire.message, reply_id)))
    finally:
        handles.pop(reply_id, None)
        engine.release(conversation)
