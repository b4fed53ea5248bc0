"""The worker process of ProcessEngine (`--engine-process`): a Qwen2AudioEngine on
its own event loop, driven over the Pipe (see process.py for the messages).

The parent sends ("open", cid, system_prompt, history), ("turn", tid, cid,
audio, text, max_new_tokens), ("cancel", tid, keep_tokens), ("release", cid),
("spec", cid, audio), ("discard", cid), ("forget", cid) (a released
conversation with nothing in flight: dropped here, opened again when used),
("edit", eid, cid, edit) and
("stop",); the worker answers ("ready", info) or ("error", message) once
loaded, then ("delta", tid, text, tokens), ("done", tid, text, usage, timing,
cancelled, history), ("error", tid, message), ("edited", eid, applied,
history) or ("edit_failed", eid, message) and, every STATS_INTERVAL,
("stats", 0, batch_size, kv_bytes, queued, healthy, conversations).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from multiprocessing.connection import Connection
from typing import Any

from voice_agent.engine.base import Conversation, History, TurnHandle, TurnInput
from voice_agent.engine.edits import TurnLog
from voice_agent.errors import EngineError, ModelLoadError

FAILED = "the model failed on this turn"
EDIT_FAILED = "editing the history failed"
STATS_INTERVAL = 1.0  # seconds between the worker's stats reports


def child_main(conn: Connection, model: str, kwargs: dict[str, Any]) -> None:
    """Entry point of the worker process."""
    from voice_agent.engine.qwen2_audio import Qwen2AudioEngine

    try:
        engine = Qwen2AudioEngine(model, **kwargs)
        engine.load()
    except Exception as exc:
        conn.send(("error", str(exc) if isinstance(exc, ModelLoadError) else repr(exc)))
        return
    conn.send(("ready", {"demo_model": engine.demo_model, "device": str(engine.device)}))
    asyncio.run(_serve(conn, engine))


async def _serve(conn: Connection, engine: Any) -> None:
    loop = asyncio.get_running_loop()
    await engine.start()
    convs: dict[str, Conversation] = {}
    handles: dict[int, TurnHandle] = {}
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()
    send_lock = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with send_lock:
            conn.send(msg)

    async def run_turn(tid: int, conv: Conversation, handle: TurnHandle) -> None:
        try:
            async for d in handle:
                send(("delta", tid, d.text, d.tokens))
            r = handle.result
            snapshot = _snapshot(conv)
            usage = {
                "prompt_tokens": r.usage.prompt_tokens,
                "cached_tokens": r.usage.cached_tokens,
                "completion_tokens": r.usage.completion_tokens,
            }
            timing = {
                "queue_ms": r.timing.queue_ms,
                "ttft_ms": r.timing.ttft_ms,
                "total_ms": r.timing.total_ms,
            }
            send(("done", tid, r.text, usage, timing, r.cancelled, snapshot))
        except Exception as exc:
            message = str(exc) if isinstance(exc, EngineError) else FAILED
            send(("error", tid, message))
        finally:
            handles.pop(tid, None)

    async def run_edit(eid: int, conv: Conversation, future: asyncio.Future[bool]) -> None:
        try:
            applied = await future
        except Exception as exc:
            send(("edit_failed", eid, str(exc) if isinstance(exc, EngineError) else EDIT_FAILED))
            return
        send(("edited", eid, applied, _snapshot(conv)))

    def handle_msg(msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "stop":
            stop.set()
        elif kind == "open":
            _, cid, system_prompt, snap = msg
            conv = engine.new_conversation(system_prompt, cid)
            st = conv.state
            st.messages = list(snap["messages"]) or st.messages
            st.ids = list(snap["ids"])
            st.clips = list(snap["clips"])
            st.clip_starts = list(snap["clip_starts"])
            conv.turns = snap["turns"]
            conv.audio_clips = len(st.clips)
            st.turn_log = TurnLog(snap["log"].submitted, dict(snap["log"].fates))
            convs[cid] = conv
        elif kind == "turn":
            _, tid, cid, audio, text, max_new = msg
            conv = convs[cid]
            try:
                handle = engine.submit(conv, TurnInput(audio=audio, text=text), max_new)
            except Exception as exc:
                state: Any = conv.state
                log: TurnLog = state.turn_log
                log.note(log.submit(), entered=False)  # the parent saw it submitted
                send(("error", tid, str(exc) if isinstance(exc, EngineError) else FAILED))
                return
            handles[tid] = handle
            task = loop.create_task(run_turn(tid, conv, handle))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif kind == "edit":
            _, eid, cid, edit = msg
            future = engine.edit_history(convs[cid], edit)  # now: in order with the turns
            task = loop.create_task(run_edit(eid, convs[cid], future))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif kind == "cancel":
            h = handles.get(msg[1])
            if h is not None:
                h.cancel(msg[2])
        elif kind == "release" and msg[1] in convs:
            engine.release(convs[msg[1]])
        elif kind == "forget" and msg[1] in convs:
            conv = convs.pop(msg[1])
            engine.discard_speculative(conv)
            engine.release(conv)
        elif kind == "spec" and msg[1] in convs:
            engine.prefill_speculative(convs[msg[1]], msg[2])
        elif kind == "discard" and msg[1] in convs:
            engine.discard_speculative(convs[msg[1]])

    def read() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                loop.call_soon_threadsafe(stop.set)
                return
            loop.call_soon_threadsafe(handle_msg, msg)
            if msg[0] == "stop":
                return

    async def report() -> None:
        """Every STATS_INTERVAL: the engine's figures and health, to the parent."""
        while not stop.is_set():
            stats = engine.runtime_stats()
            try:
                send(
                    (
                        "stats",
                        0,
                        stats.batch_size,
                        stats.kv_cache_bytes,
                        stats.queued,
                        engine.healthy(),
                        len(convs),
                    )
                )
            except (OSError, ValueError):  # the parent is gone
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), STATS_INTERVAL)

    threading.Thread(target=read, name="engine-pipe", daemon=True).start()
    reporter = loop.create_task(report())
    await stop.wait()
    await asyncio.gather(reporter, return_exceptions=True)
    await engine.close()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _snapshot(conv: Conversation) -> dict[str, Any]:
    """The conversation's history for the parent's mirror (the clips counted:
    the parent keeps their samples)."""
    state: Any = conv.state
    history = History.of(state, conv.turns)  # read as it is now, even if running
    return {
        "messages": history.messages,
        "ids": history.ids,
        "clips": len(history.clips),
        "clip_starts": history.clip_starts,
        "turns": history.turns,
        "log": TurnLog(state.turn_log.submitted, dict(state.turn_log.fates)),
    }
