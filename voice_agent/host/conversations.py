"""Conversations by key and owner: in use, kept for resuming (LRU), or in the store.

A conversation has a string key (the WebSocket session_id, or MQTT's
`mqtt:DEVICE[:SESSION]`) and an owner (a hash of the WebSocket token, "" when
the server has no tokens, "mqtt" for MQTT), compared with
hmac.compare_digest. A conversation is resumed only by its owner, so a
conversation of one transport is resumed by another only when the owners
match (MQTT's owner is never one a WebSocket client has).

    await open(key, owner, ...)   -> Opened | None   take it for a session:
        kept in memory -> resumed "memory"; with a shared store (or
        check_store=True) the store is asked first and a copy holding more
        turns (another replica carried it on) replaces it ("reloaded");
        not in memory -> rebuilt from the store with engine.restore ("store");
        else a new conversation under `key` ("new") when create=True, else
        None. None too when the key is in use by another session, or kept or
        stored under another owner. A read of the store that fails is logged
        and counted (SaveQueue) and the memory copy, if any, is used.
    detach(key, conversation, ...)  the session ended: keep it for resuming
        (engine.release frees its KV cache unless release=False); at most
        `capacity` are kept and at most `max_bytes` of their audio clips and
        token ids (from engine.snapshot at detach), the least recently
        detached released first (such a conversation then resumes from the
        store when there is one; without one it is gone)
    release(key)                  the session ended without keeping it (shutdown)
    save(key, conversation, ...)  snapshot now and queue the save (SaveQueue)

Counted for /metrics: `restored` (rebuilt from the store, reloads included).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import OrderedDict
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Literal

from voice_agent.engine.base import Conversation, Engine
from voice_agent.host.saving import SaveQueue

logger = logging.getLogger("voice_agent.host")

Resumed = Literal["new", "memory", "reloaded", "store"]


@dataclass(frozen=True)
class Kept:
    """A conversation no session holds now, kept for resuming."""

    conversation: Conversation
    ids_used: tuple[int, int] = (0, 0)
    owner: str = ""
    device: str | None = None
    released: bool = True  # engine.release was called at detach
    nbytes: int = 0  # its audio clips and token ids, from engine.snapshot


@dataclass(frozen=True)
class Opened:
    """A conversation taken by a session: `resumed` says where it came from."""

    key: str
    conversation: Conversation
    ids_used: tuple[int, int] = (0, 0)
    device: str | None = None
    resumed: Resumed = "new"


class Conversations:
    """The conversations of the process; see the module doc."""

    def __init__(
        self, engine: Engine, saves: SaveQueue, *, capacity: int, max_bytes: int | None = None
    ) -> None:
        self.engine = engine
        self.saves = saves
        self.capacity = max(1, capacity)
        self.max_bytes = max_bytes  # None: no bound in bytes
        self._kept: OrderedDict[str, Kept] = OrderedDict()
        self._in_use: set[str] = set()
        self.restored = 0

    @property
    def kept(self) -> MutableMapping[str, Kept]:
        """The conversations kept for resuming, least recently detached first."""
        return self._kept

    def in_use(self, key: str) -> bool:
        return key in self._in_use

    async def open(
        self,
        key: str,
        owner: str,
        *,
        system_prompt: str | None = None,
        device: str | None = None,
        create: bool = True,
        check_store: bool | None = None,
    ) -> Opened | None:
        """Take the conversation `key` for a session (see the module doc)."""
        if key in self._in_use:
            return None
        kept = self._kept.get(key)
        if kept is not None and not hmac.compare_digest(kept.owner, owner):
            return None
        self._in_use.add(key)  # reserved while the store is read
        try:
            opened = await self._open(key, owner, kept, check_store)
        except BaseException:
            self._in_use.discard(key)
            raise
        if opened is None and create:
            conversation = self.engine.new_conversation(system_prompt, conversation_id=key)
            opened = Opened(key, conversation, device=device)
        if opened is None:
            self._in_use.discard(key)
        return opened

    async def _open(
        self, key: str, owner: str, kept: Kept | None, check_store: bool | None
    ) -> Opened | None:
        store = self.saves.store
        if kept is not None:
            self._kept.pop(key, None)
            if check_store is None:
                check_store = store is not None and store.shared
            if store is None or not check_store:
                return _from(key, kept, "memory")
            try:
                turns = await self.saves.run(store.turns_of, key)
            except Exception:
                return _from(key, kept, "memory")  # counted and logged by SaveQueue
            if turns is None or turns <= kept.conversation.turns:
                return _from(key, kept, "memory")
            logger.info(
                "conversation carried on elsewhere: reloading it",
                extra={"session_id": key, "turns": turns, "had": kept.conversation.turns},
            )
        if store is None:
            return None
        try:
            record = await self.saves.run(store.load, key)
        except Exception:
            return _from(key, kept, "memory") if kept is not None else None
        have = kept.conversation.turns if kept is not None else -1
        if record is None or record.history.turns <= have:
            return _from(key, kept, "memory") if kept is not None else None
        if not hmac.compare_digest(record.owner, owner):
            return None
        try:
            conversation = self.engine.restore(key, record.system_prompt, record.history)
        except Exception:
            logger.exception("restoring a conversation failed", extra={"session_id": key})
            return _from(key, kept, "memory") if kept is not None else None
        if kept is not None:
            self.engine.release(kept.conversation)
        self.restored += 1
        resumed: Resumed = "reloaded" if kept is not None else "store"
        return Opened(key, conversation, record.ids_used, record.device, resumed)

    def detach(
        self,
        key: str,
        conversation: Conversation,
        *,
        owner: str,
        ids_used: tuple[int, int] = (0, 0),
        device: str | None = None,
        release: bool = True,
    ) -> None:
        """The session of `key` ended: keep its conversation for resuming."""
        self._in_use.discard(key)
        if release:
            self.engine.release(conversation)
        nbytes = self._nbytes(conversation)
        self._kept[key] = Kept(conversation, ids_used, owner, device, release, nbytes)
        self._kept.move_to_end(key)
        total = sum(k.nbytes for k in self._kept.values())
        while self._kept and (
            len(self._kept) > self.capacity
            or (self.max_bytes is not None and total > self.max_bytes)
        ):
            _, old = self._kept.popitem(last=False)
            total -= old.nbytes
            if not old.released:
                self.engine.release(old.conversation)

    @property
    def kept_bytes(self) -> int:
        """Audio clips and token ids held by the kept conversations."""
        return sum(k.nbytes for k in self._kept.values())

    def _nbytes(self, conversation: Conversation) -> int:
        if self.max_bytes is None:
            return 0
        try:
            history = self.engine.snapshot(conversation)
        except Exception:
            return 0
        if history is None:
            return 0
        return sum(int(getattr(c, "nbytes", 0)) for c in history.clips) + 8 * len(history.ids)

    def release(self, key: str) -> None:
        """The session of `key` ended; its conversation is not kept."""
        self._in_use.discard(key)

    def save(
        self,
        key: str,
        conversation: Conversation,
        *,
        owner: str,
        ids_used: tuple[int, int] = (0, 0),
        device: str | None = None,
    ) -> asyncio.Future[bool] | None:
        """Snapshot the conversation now and queue its save; None without a
        store, or when the engine has no settled history to give now (the
        next finished turn saves it)."""
        if self.saves.store is None:
            return None
        from voice_agent.store import StoredSession

        try:
            history = self.engine.snapshot(conversation)
        except Exception:
            logger.exception("snapshot failed", extra={"session_id": key})
            return None
        if history is None:
            return None
        record = StoredSession(
            session_id=key,
            owner=owner,
            device=device,
            system_prompt=conversation.system_prompt,
            ids_used=ids_used,
            history=history,
        )
        return self.saves.submit(record)


def _from(key: str, kept: Kept, resumed: Resumed) -> Opened:
    return Opened(key, kept.conversation, kept.ids_used, kept.device, resumed)
