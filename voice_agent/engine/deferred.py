"""An engine loaded when the server starts it, after its port is open.

`voice-agent serve` wraps the model load (loader.load_engine: the weights, or
the demo model) in a DeferredEngine, so the server listens at once: /healthz
answers 200 and /readyz 503 while the weights load, and the realtime endpoint
turns connections away (1013, try again later). `start()` runs the load on a
daemon thread (a signal during the load does not wait for it to finish), logs
a progress line every `progress_every` seconds while it lasts (the engine's
own lines say which phase it is in), then starts the loaded engine. A load
that fails raises its error (errors.ModelLoadError) from `start()`.

Every other call goes to the loaded engine. Before it is there, `submit` and
`restore` raise EngineError, `edit_history`'s future fails with it,
`runtime_stats` reports zeros and `ready()` is False.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import threading
import time
from collections.abc import Callable

from voice_agent.engine.base import (
    AudioArray,
    Conversation,
    Engine,
    EngineStats,
    History,
    HistoryEdit,
    TurnHandle,
    TurnInput,
    edit_future,
)
from voice_agent.errors import EngineError

logger = logging.getLogger("voice_agent.engine")

_LOADING = "the model is still loading, try again"


class DeferredEngine(Engine):
    """The engine `load()` returns (blocking; run on a thread), loaded at `start()`."""

    def __init__(
        self, load: Callable[[], Engine], model_name: str = "", *, progress_every: float = 10.0
    ) -> None:
        self._load = load
        self.model_name = model_name  # the loaded engine's name once it is there
        self.progress_every = progress_every
        self.inner: Engine | None = None
        self.loading_since: float | None = None  # time.monotonic() when the load began

    @property
    def loaded(self) -> bool:
        return self.inner is not None

    def loading_seconds(self) -> float:
        """Seconds the load has run so far (0 before it began or once done)."""
        if self.inner is not None or self.loading_since is None:
            return 0.0
        return time.monotonic() - self.loading_since

    async def start(self) -> None:
        if self.inner is None:
            inner = await self._load_on_thread()
            gc.collect()  # as server.freeze_startup_heap: the model's objects
            gc.freeze()  # stay out of every later full collection
            self.inner = inner
            self.model_name = inner.model_name
            self.demo_model = inner.demo_model
        await self.inner.start()

    async def _load_on_thread(self) -> Engine:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Engine] = loop.create_future()

        def settle(engine: Engine | None, error: BaseException | None) -> None:
            if future.done():  # cancelled meanwhile (the server is stopping)
                return
            if error is not None:
                future.set_exception(error)
            else:
                assert engine is not None
                future.set_result(engine)

        def work() -> None:
            engine: Engine | None = None
            error: BaseException | None = None
            try:
                engine = self._load()
            except BaseException as exc:
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, engine, error)

        self.loading_since = time.monotonic()
        logger.info("loading the model; /readyz answers 503 until it is ready")
        threading.Thread(target=work, name="voice-agent-model-load", daemon=True).start()
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=self.progress_every)
                if done:
                    break
                logger.info(
                    "still loading the model (%.0f s so far)",
                    self.loading_seconds(),
                    extra={"model": self.model_name, "elapsed_s": round(self.loading_seconds())},
                )
        finally:
            future.cancel()  # no-op once it is done
        engine = future.result()
        logger.info(
            "model loaded in %.1f s",
            time.monotonic() - self.loading_since,
            extra={"model": engine.model_name, "demo_model": engine.demo_model},
        )
        return engine

    def _engine(self) -> Engine:
        if self.inner is None:
            raise EngineError(_LOADING)
        return self.inner

    async def close(self) -> None:
        if self.inner is not None:
            await self.inner.close()

    def new_conversation(
        self, system_prompt: str | None = None, conversation_id: str | None = None
    ) -> Conversation:
        return self._engine().new_conversation(system_prompt, conversation_id)

    def submit(
        self, conversation: Conversation, turn: TurnInput, max_new_tokens: int | None = None
    ) -> TurnHandle:
        return self._engine().submit(conversation, turn, max_new_tokens)

    def release(self, conversation: Conversation) -> None:
        if self.inner is not None:
            self.inner.release(conversation)

    def history_text(self, conversation: Conversation) -> str:
        return self._engine().history_text(conversation)

    def edit_history(self, conversation: Conversation, edit: HistoryEdit) -> asyncio.Future[bool]:
        if self.inner is None:
            future = edit_future()
            future.set_exception(EngineError(_LOADING))
            return future
        return self.inner.edit_history(conversation, edit)

    def snapshot(self, conversation: Conversation) -> History | None:
        return None if self.inner is None else self.inner.snapshot(conversation)

    def restore(
        self, conversation_id: str, system_prompt: str | None, history: History
    ) -> Conversation:
        return self._engine().restore(conversation_id, system_prompt, history)

    def prefill_speculative(self, conversation: Conversation, audio: AudioArray) -> bool:
        return self.inner is not None and self.inner.prefill_speculative(conversation, audio)

    def discard_speculative(self, conversation: Conversation) -> None:
        if self.inner is not None:
            self.inner.discard_speculative(conversation)

    def runtime_stats(self) -> EngineStats:
        return EngineStats() if self.inner is None else self.inner.runtime_stats()

    async def ready(self) -> bool:
        return self.inner is not None and await self.inner.ready()
