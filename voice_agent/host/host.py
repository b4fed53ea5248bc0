"""ConversationHost: what every transport hosts its sessions with (see host/__init__.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
import time
import uuid
from collections.abc import Awaitable, Callable

from voice_agent.commands import DeviceList, prompt_text
from voice_agent.config import Config
from voice_agent.engine.base import Engine
from voice_agent.errors import Busy, WireError
from voice_agent.host.admission import Admission
from voice_agent.host.conversations import Conversations, Opened, Resumed
from voice_agent.host.report import report
from voice_agent.host.saving import MAX_PENDING_SAVES, SaveQueue, StoreLike
from voice_agent.host.speaking import reply_speaker
from voice_agent.hub import CommandBus, load_devices
from voice_agent.live import LiveSession, session_config
from voice_agent.metrics import Metric, Metrics, counter, gauge
from voice_agent.protocol import ReplyCancelled, ReplyDone, ServerEvent
from voice_agent.session import SessionConfig
from voice_agent.tts.speaker import AudioSink, EventSink, ReplySpeaker, Speech

logger = logging.getLogger("voice_agent.host")

SendFn = Callable[[ServerEvent], Awaitable[None]]
PlaybackHook = Callable[[str, bool], Awaitable[None]]

# Conversations kept in memory for resuming, at least (every transport shares
# them; `max_sessions` when larger): what MQTT kept before the host existed.
KEPT_CONVERSATIONS = 1024
# Seconds the engine gets to settle the turns cancelled at shutdown.
SETTLE_TIMEOUT = 2.0
# Seconds a resume waits for the conversation's session to end when a session
# of the same owner still holds it: a client whose connection dropped is often
# back before the server has noticed the drop (benchmarks/soak.py).
RESUME_WAIT = 3.0


class ConversationHost:
    """Conversations, saving, speaking, admission and error reports of one
    process, shared by its transports; see the package doc."""

    def __init__(
        self,
        config: Config,
        engine: Engine,
        *,
        store: StoreLike | None = None,
        speech: Speech | None = None,
        bus: CommandBus | None = None,
        metrics: Metrics | None = None,
        devices: DeviceList | None = None,
        capacity: int | None = None,
        max_pending_saves: int = MAX_PENDING_SAVES,
    ) -> None:
        self.config = config
        self.engine = engine
        self.speech = speech
        self.bus = bus
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self.saves = SaveQueue(store, max_pending=max_pending_saves)
        kept = capacity if capacity is not None else max(config.max_sessions, KEPT_CONVERSATIONS)
        self.conversations = Conversations(
            engine, self.saves, capacity=kept, max_bytes=config.kept_conversation_bytes
        )
        self.admission = Admission(
            max_sessions=config.max_sessions, per_address=config.max_connections_per_client
        )
        self.devices = devices if devices is not None else load_devices(config.devices)
        # Built once: every session shares it (a session's own system prompt
        # replaces only that field).
        self.session_config = session_config(config, devices=self.devices)
        self.sessions: dict[str, LiveSession] = {}
        self._owners: dict[str, str] = {}
        self.metrics.sessions_open.set_function(lambda: len(self.sessions))
        self.metrics.add_queue("turns", lambda: [s.session.queued for s in self.sessions.values()])
        self.metrics.watch_engine(engine)
        self.metrics.add_collector(self._families)

    # -- state --------------------------------------------------------------

    def engine_started(self) -> None:
        """The engine has started: sessions are admitted from now on."""
        self.admission.loading = False

    @property
    def shutting_down(self) -> bool:
        return self.admission.shutting_down

    def config_for(self, system_prompt: str | None) -> SessionConfig:
        """The shared session config, with a session's own system prompt."""
        if system_prompt is None:
            return self.session_config
        if self.devices is not None:
            system_prompt = prompt_text(self.devices, system_prompt)
        return dataclasses.replace(self.session_config, system_prompt=system_prompt)

    # -- sessions -------------------------------------------------------------

    async def start_session(
        self,
        send: SendFn,
        *,
        resume: str | None = None,
        owner: str = "",
        sample_rate: int = 16000,
        channels: int = 1,
        system_prompt: str | None = None,
        device: str | None = None,
        session_config: SessionConfig | None = None,
    ) -> LiveSession:
        """A LiveSession: the conversation `resume` when it is kept or stored
        under `owner` and not in use (a session of that owner still holding it
        gets RESUME_WAIT s to end first), else a new one under a new id (read
        `live.session_id`). A resumed conversation keeps its device unless
        `device` is given. With a bus and a device, the session's commands go
        to the bus and the bus's commands for that device come to it.
        Finished and cancelled replies save the conversation. `session_config`
        (a transport's own turn-taking, e.g. OpenAI's turn_detection) replaces
        config_for(system_prompt)."""
        config = session_config if session_config is not None else self.config_for(system_prompt)
        opened = None
        if resume:
            opened = await self.conversations.open(resume, owner, create=False)
            if opened is None and await self._released(resume, owner):
                opened = await self.conversations.open(resume, owner, create=False)
        resumed = opened is not None
        if opened is None:
            opened = await self.conversations.open(
                uuid.uuid4().hex, owner, system_prompt=config.system_prompt, device=device
            )
            assert opened is not None  # a new key is never in use
        if device is None:
            device = opened.device
        bus = self.bus if device else None
        live = self._live(
            opened,
            send,
            owner=owner,
            config=config,
            sample_rate=sample_rate,
            channels=channels,
            device=device,
            bus=bus,
            save_on_reply=True,
            transport="realtime",
        )
        logger.info(
            "session started",
            extra={
                "session_id": opened.key,
                "sample_rate": sample_rate,
                "channels": channels,
                "device": device or "",
                "resume_requested": resume is not None,
                "resumed": opened.resumed if resumed else "",
            },
        )
        return live

    async def _released(self, key: str, owner: str) -> bool:
        """Wait up to RESUME_WAIT s for a session of `owner` holding `key` to
        end; True when it has (False at once for another owner's or none)."""
        holder = self._owners.get(key)
        if holder is None or not hmac.compare_digest(holder, owner):
            return False
        deadline = time.monotonic() + RESUME_WAIT
        while self.conversations.in_use(key):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def start_request(
        self,
        key: str,
        send: SendFn,
        *,
        owner: str,
        transport: str,
        device: str | None = None,
        check_store: bool | None = None,
    ) -> tuple[LiveSession, Resumed]:
        """A request/reply transport (MQTT): a one-request LiveSession on the
        conversation `key` itself: kept, stored (a newer stored copy replaces
        the kept one with `check_store`, see Conversations.open) or new under
        `key`; errors.Busy while another session holds it. Its commands are
        not wired to the bus (the transport publishes them). End it with
        end_request, which saves it."""
        opened = await self.conversations.open(
            key,
            owner,
            system_prompt=self.session_config.system_prompt,
            device=device,
            check_store=check_store,
        )
        if opened is None:
            raise Busy("this conversation is answering another request")
        live = self._live(
            opened,
            send,
            owner=owner,
            config=self.session_config,
            device=device if device is not None else opened.device,
            save_on_reply=False,
            transport=transport,
        )
        return live, opened.resumed

    async def end_request(self, live: LiveSession) -> asyncio.Future[bool] | None:
        """The request of a start_request session is answered: close it, queue
        its save (returned: None without a store) and keep its conversation
        with its KV cache (the next request reuses it; not during shutdown)."""
        await live.close()
        key = live.session_id
        if self.sessions.get(key) is not live:
            return None
        del self.sessions[key]
        saved = self.save(live)
        owner = self._owners.pop(key, "")
        if self.shutting_down:
            self.conversations.release(key)
        else:
            self.conversations.detach(
                key,
                live.conversation,
                owner=owner,
                ids_used=live.session.ids_used,
                device=live.device,
                release=False,
            )
        return saved

    def _live(
        self,
        opened: Opened,
        send: SendFn,
        *,
        owner: str,
        config: SessionConfig,
        device: str | None,
        save_on_reply: bool,
        transport: str,
        sample_rate: int = 16000,
        channels: int = 1,
        bus: CommandBus | None = None,
    ) -> LiveSession:
        """The LiveSession of an opened conversation, registered in .sessions."""
        key = opened.key
        live: LiveSession | None = None

        async def hosted_send(event: ServerEvent) -> None:
            await send(event)
            if save_on_reply and live is not None and isinstance(event, ReplyDone | ReplyCancelled):
                self.save(live)

        live = LiveSession(
            self.engine,
            hosted_send if save_on_reply else send,
            session_id=key,
            config=config,
            sample_rate=sample_rate,
            channels=channels,
            max_new_tokens=self.config.max_new_tokens,
            metrics=self.metrics,
            conversation=opened.conversation,
            ids_from=opened.ids_used,
            device=device,
            on_command=bus.publish if bus is not None else None,
            transport=transport,
        )
        if bus is not None and device:
            # Commands another transport extracted for this device reach this client too.
            live.add_close_callback(bus.subscribe(device, live.push_command))
        self.sessions[key] = live
        self._owners[key] = owner
        self.metrics.sessions.inc()
        return live

    def owner_of(self, live: LiveSession) -> str:
        return self._owners.get(live.session_id, "")

    def save(self, live: LiveSession) -> asyncio.Future[bool] | None:
        """Queue a save of the session's conversation (SaveQueue)."""
        return self.conversations.save(
            live.session_id,
            live.conversation,
            owner=self.owner_of(live),
            ids_used=live.session.ids_used,
            device=live.device,
        )

    async def end_session(self, live: LiveSession) -> None:
        """The session's client is gone: close it, save it and keep its
        conversation for resuming (not during shutdown); idempotent."""
        await live.close()
        key = live.session_id
        if self.sessions.get(key) is not live:
            return
        del self.sessions[key]
        self.save(live)
        owner = self._owners.pop(key, "")
        if self.shutting_down:
            self.conversations.release(key)
            return
        self.conversations.detach(
            key, live.conversation, owner=owner, ids_used=live.session.ids_used, device=live.device
        )
        self.saves.prune()

    def speaker(
        self,
        sample_rate: int,
        send_event: EventSink,
        send_audio: AudioSink,
        *,
        on_playback: PlaybackHook | None = None,
    ) -> ReplySpeaker | None:
        """A streamed speaker for one session, None when the server does not speak."""
        if self.speech is None:
            return None
        return reply_speaker(
            self.speech,
            sample_rate,
            send_event,
            send_audio,
            lead_ms=self.config.tts_lead_ms,  # paced: at most this far ahead of real time
            on_playback=on_playback,
        )

    def report(
        self,
        exc: BaseException,
        *,
        transport: str,
        session_id: str = "",
        device: str = "",
        request_id: str = "",
    ) -> WireError:
        """report.report with this host's metrics."""
        return report(
            exc,
            transport=transport,
            metrics=self.metrics,
            session_id=session_id,
            device=device,
            request_id=request_id,
        )

    # -- shutdown ---------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """Admit nothing from now on (ShuttingDown)."""
        self.admission.shutting_down = True

    async def drain(self, timeout: float | None = None) -> None:
        """Let replies in flight run for up to `timeout` seconds (default
        `drain_timeout`), cancel what still runs, and wait (bounded) for the
        engine to settle the cancelled turns."""
        lives = list(self.sessions.values())
        wait = self.config.drain_timeout if timeout is None else timeout
        deadline = time.monotonic() + wait
        while any(live.replies_in_flight for live in lives) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        running = [live for live in lives if live.replies_in_flight and not live.closed]
        await asyncio.gather(*(live.cancel() for live in running), return_exceptions=True)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while any(live.replies_in_flight for live in running) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def close_sessions(self) -> None:
        """Close every session and save it (shutdown: nothing is kept), then
        wait for the saves."""
        lives = list(self.sessions.values())
        await asyncio.gather(*(live.close() for live in lives), return_exceptions=True)
        for live in lives:
            # A transport may have ended it meanwhile (end_session saved it under
            # its owner and forgot the owner): saving again would store it ownerless.
            if self.sessions.get(live.session_id) is live:
                self.save(live)
        await self.saves.wait_saved()

    async def wait_saved(self) -> None:
        await self.saves.wait_saved()

    async def close(self) -> None:
        """After the transports stopped: wait for the saves, stop the store's
        thread (the caller closes the store itself). Idempotent."""
        self.begin_shutdown()
        await self.saves.close()

    # -- metrics ------------------------------------------------------------------

    def _families(self) -> list[Metric]:
        refused = self.admission.refused
        return [
            *self.saves.families(),
            counter(
                "sessions_restored",
                "conversations resumed from the store",
                self.conversations.restored,
            ),
            counter(
                "client_limit",
                "connections refused: too many from one address",
                refused.get("address_limit", 0),
            ),
            gauge(
                "kept_conversation_bytes",
                "audio clips and token ids of ended conversations kept in memory for resuming",
                self.conversations.kept_bytes,
            ),
        ]
