"""MQTT conversations: one per (device, session), in memory (LRU) and in the
--db store as `mqtt:DEVICE[:SESSION]` (owner "mqtt"). Loads and saves run in
order on one thread of their own, off the event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections import OrderedDict

from voice_agent.engine.base import Conversation, Engine
from voice_agent.store import Store, StoredSession

from .stats import MqttStats
from .topics import STORE_OWNER, store_id

logger = logging.getLogger("voice_agent.mqtt")

# (device, session) pairs kept in memory; the least recently used is released
# (with a store it is loaded again at the device's next request).
MAX_CONVERSATIONS = 1024


class MqttConversations:
    """The conversations of the MQTT devices; see the module doc."""

    def __init__(
        self,
        engine: Engine,
        store: Store | None,
        stats: MqttStats,
        *,
        system_prompt: str | None,
        share_group: str | None,
        capacity: int = MAX_CONVERSATIONS,
    ) -> None:
        self.engine = engine
        self.store = store
        self.stats = stats
        self.system_prompt = system_prompt
        self.share_group = share_group
        self.capacity = max(1, capacity)
        self._saver = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mqtt-store")
            if store is not None
            else None
        )
        self._saves: set[asyncio.Future[None]] = set()
        self._memory: OrderedDict[tuple[str, str | None], Conversation] = OrderedDict()

    async def get(self, device: str, session: str | None) -> Conversation:
        """The conversation of (device, session): the one in memory, unless the
        store holds more turns of it (this process restarted, or another gateway
        of the share group answered since), else a new one."""
        key = (device, session)
        conv = self._memory.get(key)
        if self.store is not None and (conv is None or self.share_group or self.store.shared):
            loaded = await self._load_newer(device, store_id(device, session), conv)
            if loaded is not None:
                if conv is not None:
                    self.engine.release(conv)
                conv = self._memory[key] = loaded
        if conv is None:
            cid = store_id(device, session)
            conv = self.engine.new_conversation(self.system_prompt, conversation_id=cid)
            self._memory[key] = conv
        self._memory.move_to_end(key)
        while len(self._memory) > self.capacity:
            _, old = self._memory.popitem(last=False)
            self.engine.release(old)
        return conv

    async def _load_newer(
        self, device: str, sid: str, conv: Conversation | None
    ) -> Conversation | None:
        """The stored conversation `sid` rebuilt, when the store holds more turns
        than `conv` (None: not in memory); else None. Failures are logged and the
        turn goes on with what is in memory."""
        store, saver = self.store, self._saver
        assert store is not None and saver is not None
        have = conv.turns if conv is not None else 0
        loop = asyncio.get_running_loop()
        try:
            # On the store's thread, so after this gateway's own saves.
            if conv is not None:
                turns = await loop.run_in_executor(saver, store.turns_of, sid)
                if turns is None or turns <= have:
                    return None
            record = await loop.run_in_executor(saver, store.load, sid)
        except Exception:
            self.stats.store_errors += 1
            logger.exception("loading a conversation failed", extra={"device": device})
            return None
        if record is None or record.history.turns <= have:
            return None
        try:
            restored = self.engine.restore(sid, record.system_prompt, record.history)
        except Exception:
            self.stats.store_errors += 1
            logger.exception("restoring a conversation failed", extra={"device": device})
            return None
        self.stats.conversations_loaded += 1
        logger.info(
            "conversation loaded from the store",
            extra={"device": device, "session_id": sid, "turns": restored.turns, "had": have},
        )
        return restored

    def save(self, device: str, conv: Conversation) -> asyncio.Future[None] | None:
        """Queue a save of the conversation (in order, off the loop); None when
        there is no store or the engine has no settled history to give now."""
        store, saver = self.store, self._saver
        if store is None or saver is None:
            return None
        try:
            history = self.engine.snapshot(conv)
        except Exception:
            logger.exception("snapshot failed", extra={"device": device})
            return None
        if history is None:
            return None
        record = StoredSession(
            session_id=conv.conversation_id,
            owner=STORE_OWNER,
            device=device,
            system_prompt=conv.system_prompt,
            history=history,
        )
        future = asyncio.wrap_future(saver.submit(self._save_now, store, record))
        self._saves.add(future)
        future.add_done_callback(self._saves.discard)
        return future

    def _save_now(self, store: Store, record: StoredSession) -> None:
        try:
            store.save(record)
        except Exception:
            self.stats.store_errors += 1
            logger.exception("saving a conversation failed", extra={"device": record.device})

    async def wait_saved(self) -> None:
        """Wait until every queued save is done."""
        while self._saves:
            await asyncio.gather(*list(self._saves), return_exceptions=True)
            self._saves = {f for f in self._saves if not f.done()}

    async def close(self) -> None:
        """Wait for the queued saves (before the caller closes the store), stop the thread."""
        await self.wait_saved()
        if self._saver is not None:
            self._saver.shutdown(wait=False)
