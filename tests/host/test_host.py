"""ConversationHost: sessions of every transport on one set of conversations."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.helpers.recorders import EventRecorder
from voice_agent.config import Config
from voice_agent.engine.base import Conversation, History, TurnInput
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.host import ConversationHost
from voice_agent.store import Store


def echo(turn: TurnInput) -> str:
    return f"echo {turn.text}"


async def one_turn(host: ConversationHost, text: str, **start: object) -> str:
    """Start (or resume) a session, one typed turn, end it: its session id."""
    inbox = EventRecorder()
    live = await host.start_session(inbox.send, **start)  # type: ignore[arg-type]
    await live.text(text)
    await inbox.until_done()
    await host.end_session(live)
    return live.session_id


async def test_resume_across_transports_only_with_the_same_owner(tmp_path: Path) -> None:
    config = Config()
    engine = ScriptedEngine(echo, token_delay=0.0)
    store = Store(tmp_path / "db.sqlite")
    host = ConversationHost(config, engine, store=store)
    host.engine_started()
    # A WebSocket client (no tokens: owner "") talks, leaves, comes back.
    sid = await one_turn(host, "one")
    assert await one_turn(host, "two", resume=sid) == sid
    # MQTT's conversation of the kitchen (owner "mqtt"), one turn, saved.
    opened = await host.conversations.open("mqtt:kitchen", "mqtt", device="kitchen")
    assert opened is not None and opened.resumed == "new"
    handle = engine.submit(opened.conversation, TurnInput(text="lights"))
    async for _ in handle:
        pass
    saved = host.conversations.save(
        "mqtt:kitchen", opened.conversation, owner="mqtt", device="kitchen"
    )
    assert saved is not None and await saved
    host.conversations.detach("mqtt:kitchen", opened.conversation, owner="mqtt", release=False)
    # a WebSocket client cannot take it (another owner): a new conversation
    assert await one_turn(host, "mine?", resume="mqtt:kitchen") != "mqtt:kitchen"
    # and MQTT cannot take the WebSocket one
    assert await host.conversations.open(sid, "mqtt", create=False) is None
    await host.close()
    # Restarted: both come back from the store, each for its own owner only.
    again = ConversationHost(config, engine, store=store)
    again.engine_started()
    assert await again.conversations.open(sid, "mqtt", create=False) is None
    assert await one_turn(again, "three", resume=sid) == sid
    assert again.conversations.restored == 1
    kitchen = await again.conversations.open("mqtt:kitchen", "mqtt", create=False)
    assert kitchen is not None and kitchen.resumed == "store"
    assert kitchen.conversation.turns == 1 and kitchen.device == "kitchen"
    await again.close()
    stored = store.load(sid)
    assert stored is not None and stored.history.turns == 3
    store.close()


async def test_the_session_config_is_built_once() -> None:
    host = ConversationHost(Config(system_prompt="server prompt"), ScriptedEngine())
    assert host.config_for(None) is host.session_config
    own = host.config_for("be brief")
    assert own.system_prompt == "be brief" and own.vad is host.session_config.vad


async def test_sessions_are_registered_and_shutdown_saves_them(tmp_path: Path) -> None:
    store = Store(tmp_path / "db.sqlite")
    host = ConversationHost(Config(), ScriptedEngine(echo, token_delay=0.0), store=store)
    host.engine_started()
    inbox = EventRecorder()
    live = await host.start_session(inbox.send)
    assert host.sessions == {live.session_id: live}
    assert host.metrics.sessions_active == 1
    await live.text("hello")
    await inbox.until_done()
    host.begin_shutdown()
    await host.drain(0)
    await host.close_sessions()
    await host.end_session(live)  # the transport's own end: nothing kept at shutdown
    assert not host.sessions and live.session_id not in host.conversations.kept
    await host.close()
    stored = store.load(live.session_id)
    assert stored is not None and stored.history.turns == 1
    store.close()


async def test_a_client_back_before_its_dropped_connection_is_noticed_resumes() -> None:
    """A client whose network dropped reconnects with its session_id while the
    server has not yet ended the old connection's session (a busy event loop
    notices the drop a moment later): it resumes once that session ends,
    instead of getting a new conversation (found by benchmarks/soak.py)."""
    import asyncio

    host = ConversationHost(Config(), ScriptedEngine(echo, token_delay=0.0))
    host.engine_started()
    inbox = EventRecorder()
    old = await host.start_session(inbox.send)
    await old.text("one")
    await inbox.until_done()

    async def noticed_late() -> None:
        await asyncio.sleep(0.3)
        await host.end_session(old)

    later = asyncio.create_task(noticed_late())
    again = await host.start_session(EventRecorder().send, resume=old.session_id)
    await later
    assert again.session_id == old.session_id
    assert again.conversation is old.conversation
    # a session of another owner is not waited for: a new conversation at once
    other = await host.start_session(EventRecorder().send, resume=again.session_id, owner="x")
    assert other.session_id != again.session_id
    await host.close()


class ClipScriptedEngine(ScriptedEngine):
    """A history of one 1-second float32 clip and 100 ids, as the real engines'."""

    def snapshot(self, conversation: Conversation) -> History | None:
        return History(clips=[np.zeros(16000, dtype=np.float32)], ids=[0] * 100)


async def test_metrics_show_the_bytes_of_kept_conversations() -> None:
    host = ConversationHost(Config(), ClipScriptedEngine(echo, token_delay=0.0))
    host.engine_started()

    def kept_gauge() -> float:
        for line in host.metrics.render().decode().splitlines():
            if line.startswith("voice_agent_kept_conversation_bytes "):
                return float(line.split()[1])
        raise AssertionError("no voice_agent_kept_conversation_bytes in /metrics")

    assert kept_gauge() == 0
    await one_turn(host, "remember me")
    assert host.conversations.kept_bytes == 64_000 + 800
    assert kept_gauge() == host.conversations.kept_bytes
    await host.close()
