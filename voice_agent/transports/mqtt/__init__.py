"""MQTT transport (aiomqtt): requests on PREFIX/DEVICE/ask, streamed replies, commands.

A thin translation on the process's ConversationHost (voice_agent/host/):
MQTT messages in, host calls out; session events in, MQTT messages out.
Modules: topics (Topics, the broker URL), request (parsing, answered ids),
link (the aiomqtt client, TLS, backoff, status, outbox), answer (one
request's session events -> MQTT messages), stats, transport (MqttTransport,
running_mqtt: the glue).

Topics (PROTOCOL.md, MQTT) are built only from the prefix, the requesting
device (validated `[A-Za-z0-9_-]{1,64}`) and fixed suffixes; nothing a model
or a client writes can name a topic.

    PREFIX/status               "online" retained on connect, "offline" as the will
                                and on a clean shutdown
    PREFIX/DEVICE/ask           {"id", "text"?, "audio"? (base64 file), "session"?}
    PREFIX/DEVICE/ask/audio     raw audio file bytes; the id is generated
    PREFIX/DEVICE/reply/delta   {"id", "text"} per decoded piece (QoS 0)
    PREFIX/DEVICE/reply         {"id", "text", "commands", "timing"}
    PREFIX/DEVICE/reply/audio   the spoken reply, a WAV file (16-bit mono, 22.05 kHz),
                                after PREFIX/DEVICE/reply, when the server speaks
    PREFIX/DEVICE/command       {"id", "action", "target", "value"?} per valid command
    PREFIX/DEVICE/error         {"id", "code", "message"} (id null when unknown)
    homeassistant/binary_sensor/<prefix>/status/config   HA discovery, retained

Turns: each request is one turn of a one-request session on the host
(host.start_request / end_request), run through LiveSession and Session like a
WebSocket turn (LiveSession.turn: the decoded clip and/or the text as one
whole turn, no VAD): the Session parses the reply's commands against the
`--devices` allowlist and counts the rejected ones, the session's metrics
count its turn, tokens, TTFT and errors (labelled transport="mqtt"). Order
of what a request gets: its deltas, then its commands (also delivered to
the device's WebSocket sessions through the CommandBus), then the reply,
then the WAV.

Admission: a request takes a place of the host's admission check
(`max_sessions`, shared with the WebSocket sessions; MQTT has no address, so
no per-address limit) while its turn runs. Refused, it gets an error message
with the refusal's code, `loading` (the model is not loaded yet),
`server_full` or `shutting_down`, and its id is forgotten, so the device may
send it again later. Every error message goes through host.report (counted
in transport_errors_total{transport="mqtt",code}; errors_total{code} too
unless it is a refusal, whose code closes WebSocket connections), and errors
of the turn itself (the engine refused or failed it) are counted by the
session's metrics the same way.

Connection: a persistent session (clean_session false, a fixed client id) so
QoS 1 requests published while the agent is away are delivered when it comes
back; reconnects with exponential backoff (0.5 s doubling to 30 s). A broker
that refuses the credentials on the first connection makes `start` raise
errors.BrokerAuthError (the CLI prints one line and exits non-zero); later
refusals are logged and retried. TCP_NODELAY is set on the connection (paho
leaves Nagle on, which held each small publish for the broker's delayed ACK).
`close()` cancels the replies in flight, publishes what is waiting and then
`offline` (retained), and disconnects; it does not close the host.

Several gateway replicas on one broker and prefix (`--mqtt-share-group GROUP`):
requests are taken through the shared subscriptions $share/GROUP/PREFIX/+/ask
and .../ask/audio, so the broker hands each request to one replica (messages
arrive with their plain topic). Each replica still publishes the commands of
its own WebSocket sessions. The connection uses a clean session: a replica that
leaves drops out of the group at once (mosquitto would keep handing an offline
persistent member its share of the requests); requests published while no
replica is connected are not kept. The default client id gets a random suffix
per process; an explicit --mqtt-client-id must differ per replica. Every
replica publishes the retained `online`; when one leaves (its will or a clean
close sets `offline`), the others, subscribed to PREFIX/status, publish
`online` again. The broker spreads one device's requests over the replicas;
the --db store carries the conversation between them (below). Two requests of
one device sent without waiting for the first reply may be answered in
parallel by two replicas, out of order (deploy/README.md).

Conversations: each (device, session) pair is one conversation of the host,
key `mqtt:DEVICE[:SESSION]`, owner "mqtt" (so no WebSocket client can resume
it), kept in memory between requests with its KV cache (the host's LRU,
KEPT_CONVERSATIONS) and, with --db, in the store: a conversation not in
memory is loaded from it (a restart, an LRU release); with a share group or
a shared store (PostgreSQL) the store is asked before every turn and a copy
holding more turns replaces the one in memory (another replica answered
since). After each request the conversation is saved through the host's one
SaveQueue (audio clips only with --store-audio); with a share group the reply
is published once that save is done, so the device's next request finds it on
any replica; alone, the save runs behind the reply. Failed loads and saves
are the host's to count (store_errors_total); the turn goes on from memory.

TLS (mqtts://): the broker's certificate is checked against --mqtt-ca (the
system's CAs when unset) and the host name of --mqtt; --mqtt-cert/--mqtt-key
give a client certificate. Unreadable files are a ConfigError at start. A
certificate that fails verification is logged as an error on each attempt and
retried with the usual backoff (the process stays up: no restart loop).

Bounds and what happens when full:
- requests waiting per device: `max_queued_utterances`; overall: `max_queue`;
  beyond either the request gets an error with code `busy` (its id is not
  remembered, so it may be sent again);
- answered ids: the last 256 per device, 1024 devices (LRU); a repeated id is
  ignored (counted in `stats.duplicates`);
- conversations: the host's (see above);
- outgoing messages: 4096 waiting; when full the oldest is dropped (counted);
  deltas (QoS 0) produced while disconnected are dropped, replies, commands and
  errors wait for the reconnection;
- incoming messages waiting to be read: 1024 (aiomqtt drops beyond it).

Requests of one device are answered in order, devices in parallel. Logs carry
device and request ids, sizes and counts, never audio, text or the broker
password.

Metrics (the host's metrics.Metrics): turn latency from request received to
reply published (turn_latency_seconds{transport="mqtt"}), and at scrape
time `stats` as voice_agent_mqtt_* counters (mqtt_requests_total,
mqtt_commands_published_total, ...), whether it is connected, and the depths
of the request queues and the outbox. Rejected commands are counted in
commands_rejected_total with the WebSocket sessions' (one Session counts
them). Each request is a session of one turn for sessions_total and
sessions_active.
"""

from voice_agent.transports.mqtt.answer import Answer
from voice_agent.transports.mqtt.link import (
    KEEPALIVE_S,
    MAX_INCOMING,
    MAX_OUTBOX,
    NO_DELAY,
    BrokerLink,
    tls_context,
)
from voice_agent.transports.mqtt.request import (
    ANSWERED_PER_DEVICE,
    MAX_DEVICES_TRACKED,
    MAX_ID_CHARS,
    AnsweredIds,
    Request,
    RequestError,
    parse_request,
)
from voice_agent.transports.mqtt.stats import MqttStats
from voice_agent.transports.mqtt.topics import (
    STORE_OWNER,
    BrokerUrl,
    Topics,
    default_client_id,
    parse_broker_url,
    store_id,
)
from voice_agent.transports.mqtt.transport import MqttTransport, running_mqtt

__all__ = [
    "ANSWERED_PER_DEVICE",
    "KEEPALIVE_S",
    "MAX_DEVICES_TRACKED",
    "MAX_ID_CHARS",
    "MAX_INCOMING",
    "MAX_OUTBOX",
    "NO_DELAY",
    "STORE_OWNER",
    "Answer",
    "AnsweredIds",
    "BrokerLink",
    "BrokerUrl",
    "MqttStats",
    "MqttTransport",
    "Request",
    "RequestError",
    "Topics",
    "default_client_id",
    "parse_broker_url",
    "parse_request",
    "running_mqtt",
    "store_id",
    "tls_context",
]
