"""One configuration dataclass for the whole server.

Every field has a CLI flag (`--field-name`), an environment variable
(`VOICE_AGENT_FIELD_NAME`) and a default. Precedence: flag > env var > default.
The help text of each flag is the `help` entry of the field's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voice_agent import session_defaults as D
from voice_agent.errors import ConfigError
from voice_agent.turn_schedule import parse_rechecks

ENV_PREFIX = "VOICE_AGENT_"
DEFAULT_MODEL = "Qwen/Qwen2-Audio-7B-Instruct"


def _default_demo_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "voice_agent" / "tiny-model")


def _is_postgres_url(value: str) -> bool:
    """Like store.is_postgres_url (voice_agent.store is not imported here: numpy)."""
    return value.strip().lower().startswith(("postgresql://", "postgres://"))


def _f(default: Any, help: str, **extra: Any) -> Any:
    shown = extra.pop("repr", True)  # secrets: repr=False keeps them out of repr(config)
    return field(default=default, repr=shown, metadata={"help": help, **extra})


@dataclass(frozen=True)
class Config:
    # network
    host: str = _f("127.0.0.1", "address to listen on (loopback by default)")
    port: int = _f(8765, "HTTP/WebSocket port: page, /healthz, /readyz, /metrics, /v1/realtime")
    web_dir: str | None = _f(None, "directory of the browser page (default: the bundled web/)")
    max_message_bytes: int = _f(
        65536, "largest WebSocket frame accepted; a bigger one closes the connection with 1009"
    )
    ping_interval: float = _f(20.0, "seconds between keepalive pings (0 disables them)")
    ping_timeout: float = _f(20.0, "seconds to wait for a pong before closing the connection")
    max_sessions: int = _f(100, "concurrent sessions; beyond it new connections close with 1013")
    # access (see docs/protocol.md, "Access")
    token: str | None = _f(
        None,
        "shared secret every client must send in session.start; a missing or wrong one closes "
        "the connection with 1008 (none by default: anyone who reaches the port may talk)",
    )
    tokens_file: str | None = _f(
        None, "file of accepted tokens, one per line ('#' starts a comment); adds to --token"
    )
    allowed_origins: tuple[str, ...] = _f(
        (),
        "browser Origin allowed to open /v1/realtime, exact match (scheme://host[:port]), "
        "repeatable; the server's own page and clients sending no Origin are always allowed, "
        "any other Origin is closed with 1008",
    )
    tls_cert: str | None = _f(None, "PEM certificate chain: serve https:// and wss://")
    tls_key: str | None = _f(None, "PEM private key of --tls-cert")
    # limits (see docs/protocol.md, "Limits")
    max_messages_per_second: float = _f(
        200.0,
        "messages read per connection per second (bursts of one second's worth); a faster "
        "sender is read more slowly, so TCP pushes back on it",
    )
    max_connections_per_client: int = _f(
        32,
        "open realtime connections from one client address (behind a proxy or Docker's port "
        "mapping every client has the proxy's address: raise it); beyond it close 1013",
    )
    idle_timeout: float = _f(
        300.0,
        "seconds without a client message while no reply runs before the session is "
        "closed with 1000 (0: never)",
    )
    max_audio_speed: float = _f(
        4.0,
        "audio faster than this many times real time (after a 10 s allowance) is read "
        "more slowly: the server stops reading the socket until real time catches up",
    )
    send_queue: int = _f(
        512,
        "events waiting to be sent to one client; a client that stops reading and falls "
        "this far behind is closed with 1008",
    )
    drain_timeout: float = _f(
        5.0, "on SIGTERM, seconds replies in flight may run on before they are cancelled"
    )
    # persistence (see voice_agent/store/)
    db: str = _f(
        "auto",
        "where conversations are kept: a SQLite file (WAL mode; auto: $XDG_DATA_HOME/"
        "voice_agent/conversations.db, ~/.local/share/...), or postgresql://user:pass@host:"
        "port/dbname (also postgres://; the postgres extra) shared by gateway replicas, so "
        "any replica resumes any conversation (the password is never logged); none: keep "
        "conversations in memory only",
        repr=False,
    )
    retention_days: float = _f(
        30.0, "stored conversations untouched this long are deleted (0: kept for ever)"
    )
    max_stored_sessions: int = _f(
        10000, "stored conversations at most; beyond it the least recently used are deleted"
    )
    kept_conversation_bytes: int = _f(
        16 * 2**20,
        "bytes of audio clips and token ids that ended conversations kept in memory for "
        "resuming may hold; beyond it the least recently ended are dropped from memory "
        "(a later resume reads them from --db; with --db none they are gone; 0: none kept)",
    )
    store_audio: bool = _f(
        False,
        "also store each conversation's audio clips (without it, a conversation rebuilt "
        "from the database hears silence of the same length in place of its old clips)",
    )
    ice_servers: tuple[str, ...] = _f(
        (),
        "STUN/TURN server for WebRTC, repeatable (stun:host:port, "
        "turn:user:pass@host:port); none by default, so nothing outside the LAN is contacted",
        flag="--ice-server",
    )
    # model
    model: str | None = _f(
        None,
        "model directory or hub id (default Qwen/Qwen2-Audio-7B-Instruct from the local "
        "cache; when absent the server falls back to the tiny demo model)",
    )
    demo_model_dir: str = _f(
        _default_demo_dir(), "where the tiny demo model is written when no weights are found"
    )
    device: str = _f("auto", "auto, cpu or cuda[:N]; auto uses CUDA in bfloat16 when present")
    max_new_tokens: int = _f(256, "reply tokens per turn at most")
    temperature: float = _f(0.0, "sampling temperature; 0 decodes greedily")
    top_p: float = _f(1.0, "nucleus sampling threshold when temperature > 0")
    max_queue: int = _f(64, "turns waiting for the engine; beyond it a turn is refused with busy")
    max_batch: int = _f(
        16, "turns decoded together, one batched model step for all; more turns wait their turn"
    )
    kv_cache_budget: int = _f(
        0,
        "bytes of KV cache kept for all conversations (0: no limit); over it the least recently "
        "used idle conversation's cache is dropped and rebuilt from its history at its next turn",
    )
    engine_process: bool = _f(
        False,
        "run the model in a separate worker process; if model code crashes, the worker is "
        "restarted and only the turns in flight fail (error internal)",
    )
    # remote engine (see voice_agent/engine/openai.py) and serve-model
    engine: str = _f(
        "local",
        "local (the model in this process) or openai (a remote OpenAI-compatible server with "
        "audio input: vLLM serving Qwen2-Audio, or voice-agent serve-model)",
    )
    engine_url: str | None = _f(
        None, "with --engine openai: the API base URL, e.g. http://gpu-host:8000/v1"
    )
    engine_model: str | None = _f(
        None,
        "with --engine openai: the served model name (default: the first GET /models lists); "
        "with serve-model: the name to serve under (default: --model)",
    )
    engine_api_key: str | None = _f(
        None,
        "with --engine openai: bearer token sent to the server; with serve-model: the token "
        "clients must send (never logged)",
        repr=False,
    )
    engine_timeout: float = _f(
        60.0, "with --engine openai: seconds without data from the server before a turn fails"
    )
    engine_retries: int = _f(
        2, "with --engine openai: extra connection attempts per turn when the server is down"
    )
    # conversation
    system_prompt: str | None = _f(
        None, "system prompt of every conversation (default: the model's own)"
    )
    vad: str = _f(
        D.VAD,
        "voice activity detector: webrtc (light) or silero (a small neural network that "
        "ignores music, clatter and crowd noise; needs voice-agent[turn])",
    )
    vad_aggressiveness: int = _f(
        D.VAD_AGGRESSIVENESS, "webrtcvad aggressiveness, 0 (least) to 3 (most)"
    )
    preroll_ms: int = _f(D.PREROLL_MS, "audio before the speech onset kept in the utterance")
    hangover_ms: int = _f(
        D.HANGOVER_MS,
        "silence that ends an utterance when no end-of-turn model runs (the fallback)",
    )
    turn_detection: str = _f(
        "silence",
        "how a turn ends: silence (hangover_ms of silence alone; the default until the model "
        "beats it, see benchmarks/turns.py), auto (the end-of-turn model when installed, else "
        "silence) or model (fail at start without one)",
    )
    turn_model: str | None = _f(
        None,
        "Smart Turn ONNX file for end-of-turn detection with --turn-detection auto or model "
        "(default: smart-turn-v3.2 bundled in the pipecat-ai wheel of voice-agent[turn])",
    )
    turn_threshold: float = _f(
        D.TURN_THRESHOLD,
        "end-of-turn probability at or above which the model closes the turn at min_silence_ms "
        "(0.97: the fewest-cut-offs setting of benchmarks/turns.py, picked on held-out "
        "recordings; lower answers sooner and cuts people off more)",
    )
    min_silence_ms: int = _f(
        D.MIN_SILENCE_MS, "with the model: silence after which it judges the turn"
    )
    turn_rechecks: str = _f(
        "",
        "with the model: later checks of the same pause as SILENCE_MS:THRESHOLD pairs, e.g. "
        "400:0.8,800:0.6 (the model judges again after that much silence and closes the turn "
        "at or above that threshold); empty: one check, at min_silence_ms",
    )
    max_silence_ms: int = _f(
        D.MAX_SILENCE_MS, "with the model: silence that ends a turn the model judged unfinished"
    )
    min_speech_ms: int = _f(D.MIN_SPEECH_MS, "shorter bursts of sound are dropped as noise")
    max_utterance_ms: int = _f(
        D.MAX_UTTERANCE_MS, "longer speech is closed and continues as the next utterance"
    )
    barge_in_ms: int = _f(D.BARGE_IN_MS, "speech this long during a reply cancels the reply")
    barge_in_speaking_ms: int = _f(
        D.BARGE_IN_SPEAKING_MS,
        "while the reply's audio plays (reply.audio.started to the end of its playback), "
        "speech must last this long to cut it off (at least barge_in_ms), so echo of the "
        "assistant's voice that echo cancellation missed does not",
    )
    continue_window_ms: int = _f(
        D.CONTINUE_WINDOW_MS,
        "continuation: speech resuming within this long after an utterance closed (lasting "
        "barge_in_ms) takes back the reply to it, unless heard for more than "
        "continue_heard_ms, and the two are answered as one turn (reply.cancelled reason "
        "continued); 0: off",
    )
    continue_heard_ms: int = _f(
        D.CONTINUE_HEARD_MS,
        "continuation: a reply whose audio has played longer than this when speech resumes "
        "is kept (the new speech is a turn of its own)",
    )
    max_queued_utterances: int = _f(
        D.MAX_QUEUED_UTTERANCES,
        "utterances waiting behind a running reply; beyond it the oldest is dropped",
    )
    max_text_chars: int = _f(D.MAX_TEXT_CHARS, "longest typed text turn")
    # spoken replies (voice_agent/tts)
    tts: str = _f(
        "auto",
        "text to speech for spoken replies: piper (needs voice-agent[tts]), espeak "
        "(espeak-ng, always there), none (text only) or auto (piper when installed, else espeak)",
    )
    tts_voice: str | None = _f(
        None,
        "Piper voice .onnx file (its .onnx.json beside it; default: en_US-joe-medium from "
        "voice-agent[tts]), or an espeak-ng voice name with --tts espeak",
    )
    tts_lead_ms: int = _f(
        200,
        "WebSocket reply audio is sent at real time, at most this much ahead of the clock: "
        "the client's buffer and the most it drops on a cancel (0: as fast as synthesized)",
    )
    # home automation (MQTT)
    mqtt: str | None = _f(
        None, "MQTT broker URL, mqtt://[user:pass@]host:port or mqtts://...; off when unset"
    )
    mqtt_prefix: str = _f("voice_agent", "MQTT topic prefix")
    mqtt_ca: str | None = _f(
        None,
        "CA certificate file (PEM) that signed the broker's certificate, for mqtts:// "
        "(default: the system's CAs)",
    )
    mqtt_cert: str | None = _f(None, "client certificate file for mqtts://")
    mqtt_key: str | None = _f(None, "client key file for mqtts://")
    mqtt_client_id: str | None = _f(
        None,
        "MQTT client id of the agent's persistent session (default: voice-agent-PREFIX); "
        "requests sent with QoS 1 while the agent is away are kept for this id; with "
        "--mqtt-share-group it must differ per replica (default: voice-agent-PREFIX-RANDOM)",
    )
    mqtt_share_group: str | None = _f(
        None,
        "several gateway replicas on one broker and prefix: take requests through the MQTT "
        "shared subscription $share/GROUP/PREFIX/+/ask (mosquitto >= 1.6), so each request "
        "is answered by one replica; the connection then uses a clean session and the "
        "default client id gets a random suffix per process (see deploy/README.md); "
        "unset or empty: the agent answers every request it sees",
    )
    mqtt_max_payload: int = _f(
        10 * 1024 * 1024, "largest MQTT request payload in bytes; larger ones get an error"
    )
    devices: str | None = _f(
        None, "TOML file listing the devices and the actions (and value ranges) allowed for each"
    )
    # Home Assistant (Wyoming protocol; transports/wyoming/)
    wyoming: str | None = _f(
        None,
        "Wyoming server for Home Assistant (speech to text, conversation, text to speech), "
        "tcp://HOST:PORT (10700 is the usual port); off when unset",
    )
    wyoming_zeroconf: bool = _f(
        False, "announce the Wyoming server as _wyoming._tcp with zeroconf (mDNS) for discovery"
    )
    # operations
    log_level: str = _f("info", "debug, info, warning or error")
    log_format: str = _f("text", "text or json (one JSON object per line)")
    event_loop: str = _f(
        "auto",
        "asyncio event loop for `serve`: auto (uvloop when installed, else asyncio), "
        "uvloop or asyncio; uvloop costs less CPU per audio frame under many streams",
    )

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.port <= 65535:
            problems.append("port must be 0..65535")
        if not 0 <= self.vad_aggressiveness <= 3:
            problems.append("vad_aggressiveness must be 0..3")
        if self.vad not in ("webrtc", "silero"):
            problems.append("vad must be webrtc or silero")
        if self.turn_detection not in ("auto", "model", "silence"):
            problems.append("turn_detection must be auto, model or silence")
        if not 0.0 <= self.turn_threshold <= 1.0:
            problems.append("turn_threshold must be 0..1")
        if not 0 < self.min_silence_ms < self.max_silence_ms:
            problems.append("need 0 < min_silence_ms < max_silence_ms")
        problems += _recheck_problems(self.turn_rechecks, self.min_silence_ms, self.max_silence_ms)
        if self.max_message_bytes < 1024:
            problems.append("max_message_bytes must be at least 1024")
        for name in ("max_sessions", "max_queue", "max_new_tokens", "max_text_chars", "max_batch"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("max_connections_per_client", "send_queue", "max_stored_sessions"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        for name in ("max_messages_per_second", "max_audio_speed"):
            if getattr(self, name) <= 0:
                problems.append(f"{name} must be more than 0")
        for name in (
            "idle_timeout",
            "drain_timeout",
            "retention_days",
            "tts_lead_ms",
            "continue_window_ms",
            "continue_heard_ms",
        ):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be 0 or more")
        if (self.tls_cert is None) != (self.tls_key is None):
            problems.append("tls_cert and tls_key go together")
        if self.kv_cache_budget < 0:
            problems.append("kv_cache_budget must be 0 (no limit) or more")
        if self.tts not in ("auto", "piper", "espeak", "none"):
            problems.append("tts must be auto, piper, espeak or none")
        if self.engine not in ("local", "openai"):
            problems.append("engine must be local or openai")
        if self.engine == "openai" and not self.engine_url:
            problems.append("engine openai needs engine_url (the server's /v1 base URL)")
        if self.engine_url and not self.engine_url.startswith(("http://", "https://")):
            problems.append("engine_url must start with http:// or https://")
        if self.engine_timeout <= 0 or self.engine_retries < 0:
            problems.append("engine_timeout must be more than 0 and engine_retries 0 or more")
        if _is_postgres_url(self.db) and importlib.util.find_spec("psycopg") is None:
            problems.append(
                "db postgresql://... needs psycopg (pip install 'voice-agent[postgres]')"
            )
        if self.log_format not in ("text", "json"):
            problems.append("log_format must be text or json")
        if self.event_loop not in ("auto", "uvloop", "asyncio"):
            problems.append("event_loop must be auto, uvloop or asyncio")
        if not _valid_prefix(self.mqtt_prefix):
            problems.append("mqtt_prefix must be topic levels of [A-Za-z0-9_-] joined by '/'")
        if self.mqtt_share_group and not _PREFIX_LEVEL.fullmatch(self.mqtt_share_group):
            problems.append("mqtt_share_group must be 1 to 64 characters of [A-Za-z0-9_-]")
        if self.mqtt_max_payload < 1024:
            problems.append("mqtt_max_payload must be at least 1024")
        if self.wyoming and tcp_address(self.wyoming) is None:
            problems.append("wyoming must be tcp://HOST:PORT")
        if self.max_utterance_ms > 30000 or self.max_utterance_ms < 1000:
            problems.append("max_utterance_ms must be 1000..30000 (the encoder sees 30 s)")
        if problems:
            raise ConfigError("; ".join(problems))

    # -- construction -------------------------------------------------------

    @classmethod
    def from_sources(
        cls, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
    ) -> Config:
        """Build from parsed flags (None = not given) over env vars over defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            flag_value = getattr(args, f.name, None) if args is not None else None
            if flag_value is not None:
                values[f.name] = tuple(flag_value) if _is_list(f) else flag_value
                continue
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None:
                values[f.name] = _parse(f, raw)
        return cls(**values)


_PREFIX_LEVEL = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _recheck_problems(text: str, min_silence_ms: int, max_silence_ms: int) -> list[str]:
    try:
        rechecks = parse_rechecks(text)
    except ValueError as exc:
        return [str(exc)]
    if any(not min_silence_ms < ms < max_silence_ms for ms, _ in rechecks):
        return ["turn_rechecks silences must lie between min_silence_ms and max_silence_ms"]
    return []


def tcp_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a tcp://HOST:PORT URL (the Wyoming server's), None if it is not one."""
    parsed = urllib.parse.urlsplit(url.strip())
    try:
        port = parsed.port
    except ValueError:
        return None
    if parsed.scheme != "tcp" or not parsed.hostname or port is None:
        return None
    if parsed.path not in ("", "/"):
        return None
    return parsed.hostname, port


def _valid_prefix(prefix: str) -> bool:
    """A topic prefix: 1 to 8 levels of [A-Za-z0-9_-], no wildcards, no empty level."""
    levels = prefix.split("/")
    return 1 <= len(levels) <= 8 and all(_PREFIX_LEVEL.fullmatch(x) for x in levels)


def _base_type(f: dataclasses.Field[Any]) -> type:
    text = str(f.type)
    for name, typ in (("int", int), ("float", float), ("bool", bool)):
        if text.startswith(name):
            return typ
    return str


def _is_list(f: dataclasses.Field[Any]) -> bool:
    return str(f.type).startswith("tuple")


def _parse(f: dataclasses.Field[Any], raw: str) -> Any:
    if _is_list(f):  # env vars hold lists comma-separated
        return tuple(item.strip() for item in raw.split(",") if item.strip())
    typ = _base_type(f)
    try:
        if typ is bool:
            return raw.strip().lower() in ("1", "true", "yes", "on")
        return typ(raw)
    except ValueError:
        env = ENV_PREFIX + f.name.upper()
        raise ConfigError(f"{env}={raw!r} is not a valid {typ.__name__}") from None


def add_arguments(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """Add one flag per Config field (or the named subset). Defaults are None so
    that unset flags fall through to env vars and then to the dataclass default."""
    for f in dataclasses.fields(Config):
        if only is not None and f.name not in only:
            continue
        env = ENV_PREFIX + f.name.upper()
        default = f.default
        help_text = f"{f.metadata['help']} (env {env}; default: {default})"
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        typ = _base_type(f)
        if _is_list(f):
            parser.add_argument(
                flag, dest=f.name, action="append", default=None, metavar="URL", help=help_text
            )
        elif typ is bool:
            # One flag that turns it on; unset falls through to the env var.
            parser.add_argument(flag, action="store_true", default=None, help=help_text)
        else:
            parser.add_argument(
                flag, type=typ, default=None, metavar=f.name.upper(), help=help_text
            )
