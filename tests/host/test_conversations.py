"""Conversations: by key and owner, kept (LRU), resumed from memory or the store."""

from __future__ import annotations

from tests.helpers.stores import MemoryStore
from voice_agent.engine.base import Conversation, History
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.host.conversations import Conversations
from voice_agent.host.saving import SaveQueue
from voice_agent.store import StoredSession


class CountingEngine(ScriptedEngine):
    def __init__(self) -> None:
        super().__init__()
        self.released: list[str] = []

    def release(self, conversation: Conversation) -> None:
        self.released.append(conversation.conversation_id)


def stored(key: str, owner: str, turns: int, device: str | None = None) -> StoredSession:
    return StoredSession(
        session_id=key,
        owner=owner,
        device=device,
        ids_used=(turns, 0),
        history=History(turns=turns),
    )


async def test_new_kept_and_resumed_from_memory_by_its_owner_only() -> None:
    engine = CountingEngine()
    convs = Conversations(engine, SaveQueue(None), capacity=4)
    opened = await convs.open("k", "alice", system_prompt="be brief", device="kitchen")
    assert opened is not None and opened.resumed == "new"
    assert opened.conversation.system_prompt == "be brief" and opened.device == "kitchen"
    assert await convs.open("k", "alice") is None  # in use by that session
    convs.detach("k", opened.conversation, owner="alice", ids_used=(3, 1), device="kitchen")
    assert engine.released == ["k"] and "k" in convs.kept
    assert await convs.open("k", "mallory", create=False) is None
    assert await convs.open("k", "mallory") is None  # not even a new one under that key
    again = await convs.open("k", "alice", create=False)
    assert again is not None and again.resumed == "memory"
    assert again.conversation is opened.conversation
    assert (again.ids_used, again.device) == ((3, 1), "kitchen")
    assert "k" not in convs.kept and convs.in_use("k")


async def test_unknown_without_create_is_none() -> None:
    convs = Conversations(ScriptedEngine(), SaveQueue(None), capacity=4)
    assert await convs.open("nobody", "", create=False) is None
    assert not convs.in_use("nobody")


async def test_least_recently_detached_goes_first() -> None:
    engine = CountingEngine()
    convs = Conversations(engine, SaveQueue(None), capacity=2)
    for key in ("a", "b", "c"):
        opened = await convs.open(key, "mqtt")
        assert opened is not None
        convs.detach(key, opened.conversation, owner="mqtt", release=False)
    assert list(convs.kept) == ["b", "c"]
    assert engine.released == ["a"]  # kept warm until it left the LRU


async def test_restored_from_the_store_after_a_restart() -> None:
    store = MemoryStore()
    engine = ScriptedEngine()
    first = Conversations(engine, SaveQueue(store), capacity=4)
    opened = await first.open("k", "alice")
    assert opened is not None
    opened.conversation.turns = 2
    future = first.save("k", opened.conversation, owner="alice", ids_used=(5, 0), device="hall")
    assert future is not None and await future
    restarted = Conversations(engine, SaveQueue(store), capacity=4)
    assert await restarted.open("k", "bob", create=False) is None  # not bob's
    back = await restarted.open("k", "alice", create=False)
    assert back is not None and back.resumed == "store"
    assert (back.conversation.turns, back.ids_used, back.device) == (2, (5, 0), "hall")
    assert restarted.restored == 1


async def test_reloaded_when_a_shared_store_holds_more_turns() -> None:
    store = MemoryStore(shared=True)
    engine = CountingEngine()
    convs = Conversations(engine, SaveQueue(store), capacity=4)
    opened = await convs.open("k", "mqtt")
    assert opened is not None
    opened.conversation.turns = 1
    convs.detach("k", opened.conversation, owner="mqtt", release=False)
    store.records["k"] = stored("k", "mqtt", 3)  # another replica answered twice since
    again = await convs.open("k", "mqtt")
    assert again is not None and again.resumed == "reloaded"
    assert again.conversation.turns == 3 and again.conversation is not opened.conversation
    assert engine.released == ["k"]  # the stale copy was let go
    convs.detach("k", again.conversation, owner="mqtt", release=False)
    same = await convs.open("k", "mqtt")  # the store has no more than memory now
    assert same is not None and same.resumed == "memory"


async def test_the_store_is_asked_only_when_shared_or_asked_for() -> None:
    store = MemoryStore(shared=False)
    convs = Conversations(ScriptedEngine(), SaveQueue(store), capacity=4)
    opened = await convs.open("k", "mqtt")
    assert opened is not None
    convs.detach("k", opened.conversation, owner="mqtt")
    store.records["k"] = stored("k", "mqtt", 3)
    again = await convs.open("k", "mqtt")
    assert again is not None and again.resumed == "memory"
    convs.detach("k", again.conversation, owner="mqtt")
    asked = await convs.open("k", "mqtt", check_store=True)  # a share group
    assert asked is not None and asked.resumed == "reloaded"


async def test_a_failing_store_read_falls_back_to_memory() -> None:
    store = MemoryStore(shared=True)
    saves = SaveQueue(store)
    convs = Conversations(ScriptedEngine(), saves, capacity=4)
    opened = await convs.open("k", "")
    assert opened is not None
    convs.detach("k", opened.conversation, owner="")
    store.fail = True
    again = await convs.open("k", "", create=False)
    assert again is not None and again.resumed == "memory"
    assert saves.stats.errors == 1
    assert await convs.open("other", "", create=False) is None  # unknown, store down


class ClipEngine(CountingEngine):
    """Each conversation's history holds one 1-second clip (64,000 bytes of
    float32) and 100 token ids (800 bytes), as the real engines' do."""

    def snapshot(self, conversation: Conversation) -> History | None:
        import numpy as np

        return History(clips=[np.zeros(16000, dtype=np.float32)], ids=[0] * 100)


async def test_kept_conversations_are_bounded_in_bytes_too() -> None:
    # Before: only the count bounded them (1,024 by default), and each kept
    # its audio clips: a soak of many sessions grew the server by ~5 MB/min.
    engine = ClipEngine()
    convs = Conversations(engine, SaveQueue(None), capacity=100, max_bytes=3 * 64_800)
    for key in "abcdef":
        opened = await convs.open(key, "")
        assert opened is not None
        convs.detach(key, opened.conversation, owner="")
        assert convs.kept_bytes <= 3 * 64_800
    assert list(convs.kept) == ["d", "e", "f"]  # the least recently ended went
    assert convs.kept_bytes == 3 * 64_800


async def test_a_conversation_dropped_for_bytes_resumes_from_the_store() -> None:
    engine = ClipEngine()
    store = MemoryStore()
    convs = Conversations(engine, SaveQueue(store), capacity=100, max_bytes=64_800)
    for key in ("a", "b"):
        opened = await convs.open(key, "alice")
        assert opened is not None
        store.records[key] = stored(key, "alice", 2)
        convs.detach(key, opened.conversation, owner="alice")
    assert list(convs.kept) == ["b"]
    again = await convs.open("a", "alice", create=False)
    assert again is not None and again.resumed == "store"
