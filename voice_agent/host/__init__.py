"""The conversation host: what every transport hosts its sessions with.

A transport translates its wire to host calls and host events to its wire;
how conversations are kept, resumed, saved, spoken, admitted and how errors
are counted lives here, once. Layers: transports -> host -> live/session ->
engine. This docstring is the reference for the API.

ConversationHost(config, engine, *, store=None, speech=None, bus=None,
                 metrics=None, devices=None, capacity=None, max_pending_saves=256)
    One per process, shared by every transport (pass `host=` to each). It
    registers on `metrics` (its own Metrics when None): sessions_active,
    queue_depth{queue="turns"}, the engine's figures, store_* counters,
    sessions_restored_total, client_limit_total.

    .session_config             SessionConfig built once at start
    .config_for(system_prompt)  that config with a session's own prompt
    .sessions                   {session_id: LiveSession} open now
    .engine_started()           call once engine.start() returned: admission opens
    .admission                  Admission (below): .admit(address) -> Ticket
    .conversations              Conversations (below)
    .saves                      SaveQueue (below)
    .speech                     tts Speech or None (the server does not speak)

    await .start_session(send, *, resume=None, owner="", sample_rate=16000,
                         channels=1, system_prompt=None, device=None,
                         session_config=None) -> LiveSession
        resumes `resume` (kept in memory or in the store, same owner, not in
        use) or starts a new conversation under a new id (live.session_id);
        registers it in .sessions; finished/cancelled replies save it; with a
        bus and a device, commands go to and come from the bus;
        session_config (a SessionConfig) replaces config_for(system_prompt).
    await .start_request(key, send, *, owner, transport, device=None,
                         check_store=None) -> (LiveSession, resumed)
        request/reply transports (MQTT, Wyoming's handle): a session for one request on the
        conversation `key` itself (kept, stored, or new under `key`;
        errors.Busy while in use); LiveSession(transport=...) labels its
        metrics; no bus wiring (the transport publishes its commands); not
        saved per reply: await .end_request(live) closes it, queues its save
        (returns the future, None without a store) and keeps the
        conversation with its KV cache for the next request.
    .save(live) -> Future[bool] | None      queue a save now
    await .end_session(live)    close, save, keep for resuming (idempotent;
                                not kept during shutdown)
    .owner_of(live) -> str
    .speaker(rate, send_event, send_audio, on_playback=None) -> ReplySpeaker | None
        streamed speech for one session (speaking.py)
    .report(exc, *, transport, session_id="", device="", request_id="") -> WireError
        report.py with this host's metrics
    shutdown, in order: .begin_shutdown() (admit nothing), await .drain()
        (replies get drain_timeout, then cancelled), await .close_sessions()
        (close + save all, wait for saves), await .close() (stop the store
        thread; the owner of the store closes it afterwards)

Conversations (conversations.py): keyed by string, owned by an owner string
(compared with hmac.compare_digest). WebSocket: key = session_id, owner =
token hash or "". MQTT: key = `mqtt:DEVICE[:SESSION]`, owner "mqtt". Wyoming:
key = `wyoming:CONVERSATION_ID` (Home Assistant's), owner "wyoming".
    await .open(key, owner, *, system_prompt=None, device=None, create=True,
                check_store=None) -> Opened | None
        Opened(key, conversation, ids_used, device, resumed) with resumed in
        "new" | "memory" | "reloaded" (the store had more turns) | "store";
        None: in use, another owner's, or unknown with create=False.
        check_store (default: store.shared) asks the store for newer turns
        even when the conversation is in memory (MQTT share groups: True).
    .detach(key, conversation, *, owner, ids_used=(0, 0), device=None,
            release=True)      keep it (LRU, `capacity`); release=False keeps
                               its KV cache (MQTT's next request reuses it)
    .release(key)              give the key up without keeping it
    .save(key, conversation, *, owner, ids_used=(0, 0), device=None)
        -> Future[bool] | None snapshot + SaveQueue.submit
    .kept (mapping key -> Kept), .in_use(key), .restored (count)

SaveQueue (saving.py): one thread, one bounded queue for the process.
    .submit(StoredSession) -> Future[bool] | None   True saved, False failed
        or dropped; a pending save of the same key is replaced in place; at
        max_pending the oldest pending is dropped (stats.dropped); failures
        are counted (stats.errors), not retried, serving goes on
    await .run(fn, *args)      a read on the store thread after pending saves
    .prune(), await .wait_saved(), await .close(), .stats, .pending

Admission (admission.py): .admit(address="") -> Ticket (.release(), `with`)
    raises errors.ShuttingDown (1001), ModelLoading (1013), ServerFull
    (1013), TooManyFromAddress (1013); .check(address) raises the same
    without taking a place; .refused counts by code.

report(exc, *, transport, metrics=None, session_id="", device="",
       request_id="") -> WireError (report.py): errors.to_wire + counts in
    voice_agent_transport_errors_total{transport,code} (everything) and
    voice_agent_errors_total{code} (only errors sent as error events or
    messages, i.e. no close code) + one structured log line. Transport
    labels: "realtime" (the native WebSocket protocol), "mqtt", "openai" (the
    OpenAI Realtime protocol), "wyoming" (Home Assistant's Wyoming protocol).

Speaking (speaking.py, on tts/pipeline.py's SentenceAudio):
    reply_speaker(...) -> ReplySpeaker    streamed PCM frames (WebSocket)
    WavReply(speech, sample_rate=WAV_RATE): .feed(text), .finish(),
        .cancel(), await .wav() -> bytes | None   one WAV (MQTT)
"""

from voice_agent.host.admission import Admission, Ticket
from voice_agent.host.conversations import Conversations, Kept, Opened
from voice_agent.host.host import KEPT_CONVERSATIONS, ConversationHost
from voice_agent.host.report import report
from voice_agent.host.saving import MAX_PENDING_SAVES, SaveQueue, SaveStats, StoreLike
from voice_agent.host.speaking import WAV_RATE, SentenceAudio, WavReply, join_wav, reply_speaker

__all__ = [
    "KEPT_CONVERSATIONS",
    "MAX_PENDING_SAVES",
    "WAV_RATE",
    "Admission",
    "ConversationHost",
    "Conversations",
    "Kept",
    "Opened",
    "SaveQueue",
    "SaveStats",
    "SentenceAudio",
    "StoreLike",
    "Ticket",
    "WavReply",
    "join_wav",
    "reply_speaker",
    "report",
]
