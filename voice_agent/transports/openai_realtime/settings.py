"""The GA session object (pure): `session.update` validated into Settings,
Settings written back as the `session` of session.created/updated, and mapped
onto the native SessionConfig.

Mapping (docs/openai-realtime.md): `instructions` -> the system prompt;
`audio.input.turn_detection` server_vad -> the Segmenter (silence_duration_ms
-> hangover, prefix_padding_ms -> pre-roll, threshold -> the webrtc VAD's
aggressiveness, interrupt_response -> barge-in on/off), semantic_vad -> the
end-of-turn model (eagerness -> its threshold; without the model, the silence
hangover scaled), null -> manual turns (the translator buffers the audio);
`max_output_tokens` -> the engine's max_new_tokens; `audio.output.voice` is
echoed (the server speaks with its one TTS voice). What is refused is refused
by name (errors.Unsupported), never ignored.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from voice_agent.errors import InvalidField, Unsupported
from voice_agent.session import SessionConfig
from voice_agent.transports.openai_realtime.codec import format_object, parse_format

VOICE = "alloy"  # what session.created says until a client sets one
EAGERNESS = {"low": 0.85, "high": 0.3}  # end-of-turn threshold; medium/auto: the server's
_SESSION_KEYS = {
    "type",
    "model",
    "instructions",
    "output_modalities",
    "audio",
    "max_output_tokens",
    "tools",
    "tool_choice",
    "tracing",
    "truncation",
    "prompt",
    "include",
    "reasoning",
    "parallel_tool_calls",
}
_VAD_KEYS = {
    "type",
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "create_response",
    "interrupt_response",
    "idle_timeout_ms",
    "eagerness",
}


@dataclass(frozen=True)
class TurnDetection:
    type: str  # "server_vad" | "semantic_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None
    eagerness: str = "auto"

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "type": self.type,
            "create_response": self.create_response,
            "interrupt_response": self.interrupt_response,
        }
        if self.type == "server_vad":
            out |= {
                "threshold": self.threshold,
                "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms,
                "idle_timeout_ms": self.idle_timeout_ms,
            }
        else:
            out["eagerness"] = self.eagerness
        return out


@dataclass(frozen=True)
class Settings:
    instructions: str = ""
    output_modalities: tuple[str, ...] = ("audio",)
    input_format: str = "audio/pcm"
    output_format: str = "audio/pcm"
    voice: str = VOICE
    turn_detection: TurnDetection | None = field(
        default_factory=lambda: TurnDetection("server_vad")
    )
    max_output_tokens: int | None = None  # None: "inf"
    transcription: dict[str, Any] | None = None  # input transcription on (echoed as given)

    @property
    def audio_out(self) -> bool:
        return "audio" in self.output_modalities

    @property
    def vad(self) -> bool:
        """The Session's VAD cuts the turns and answers them (server_vad or
        semantic_vad with create_response)."""
        return self.turn_detection is not None and self.turn_detection.create_response

    @property
    def own_vad(self) -> bool:
        """create_response false: the translator's own Segmenter cuts the turns
        (silence only) and they wait for response.create."""
        return self.turn_detection is not None and not self.turn_detection.create_response


def initial(base: SessionConfig) -> Settings:
    """The settings session.created reports: the server's own turn-taking."""
    return Settings(
        instructions=base.system_prompt or "",
        turn_detection=TurnDetection(
            "server_vad",
            prefix_padding_ms=base.vad.preroll_ms,
            silence_duration_ms=base.vad.hangover_ms,
            interrupt_response=base.barge_in_ms > 0,
        ),
    )


def _get(obj: dict[str, Any], key: str, kinds: type | tuple[type, ...], param: str) -> Any:
    value = obj[key]
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise InvalidField(f"{param} has the wrong type", param)
    if not isinstance(value, kinds):
        raise InvalidField(f"{param} has the wrong type", param)
    return value


def _unknown(obj: dict[str, Any], known: set[str], param: str) -> None:
    for key in obj:
        if key not in known:
            raise InvalidField(f"unknown parameter '{param}.{key}'", f"{param}.{key}")


def _modalities(value: Any, param: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or any(v not in ("text", "audio") for v in value):
        raise InvalidField(f'{param} must be ["text"] or ["audio"]', param)
    if len(set(value)) > 1:
        raise InvalidField(f"{param}: text and audio cannot both be asked for", param)
    return (value[0],)


def _max_tokens(value: Any, param: str) -> int | None:
    if value == "inf" or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 4096:
        raise InvalidField(f'{param} must be an integer from 1 to 4096 or "inf"', param)
    return value


def refuse_tools(obj: dict[str, Any], param: str) -> None:
    """tools, tool_choice, prompt ...: what this server cannot do, by name."""
    if obj.get("tools"):
        raise Unsupported("tools and function calls are not supported", f"{param}.tools")
    choice = obj.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        raise Unsupported(
            "tool_choice other than auto/none is not supported", f"{param}.tool_choice"
        )
    if obj.get("prompt") is not None:
        raise Unsupported("prompt templates are not supported", f"{param}.prompt")


def _turn_detection(value: Any, old: TurnDetection | None, param: str) -> TurnDetection | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidField(f"{param} must be an object or null", param)
    _unknown(value, _VAD_KEYS, param)
    kind = value.get("type", old.type if old is not None else "server_vad")
    if kind not in ("server_vad", "semantic_vad"):
        raise InvalidField(f"{param}.type must be server_vad or semantic_vad", f"{param}.type")
    td = old if old is not None and old.type == kind else TurnDetection(kind)
    changes: dict[str, Any] = {}
    for key, kinds in (
        ("threshold", (int, float)),
        ("prefix_padding_ms", int),
        ("silence_duration_ms", int),
        ("create_response", bool),
        ("interrupt_response", bool),
        ("idle_timeout_ms", (int, type(None))),
        ("eagerness", str),
    ):
        if key in value:
            changes[key] = _get(value, key, kinds, f"{param}.{key}")
    if "threshold" in changes and not 0.0 <= changes["threshold"] <= 1.0:
        raise InvalidField(f"{param}.threshold must be from 0.0 to 1.0", f"{param}.threshold")
    for key in ("prefix_padding_ms", "silence_duration_ms"):
        if key in changes and not 0 <= changes[key] <= 10000:
            raise InvalidField(f"{param}.{key} must be from 0 to 10000", f"{param}.{key}")
    if changes.get("eagerness", "auto") not in ("low", "medium", "high", "auto"):
        raise InvalidField(f"{param}.eagerness must be low, medium, high or auto", param)
    idle = changes.get("idle_timeout_ms")
    if idle is not None and not 5000 <= idle <= 30000:
        raise InvalidField(f"{param}.idle_timeout_ms must be from 5000 to 30000", param)
    return dataclasses.replace(td, **changes)


def _transcription(value: Any, param: str) -> dict[str, Any] | None:
    """Input transcription: on with any model name (the server's own model
    transcribes); language and prompt are passed to it."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidField(f"{param} must be an object or null", param)
    _unknown(value, {"model", "language", "prompt", "delay", "keywords", "languages"}, param)
    for key in ("model", "language", "prompt"):
        if value.get(key) is not None and not isinstance(value[key], str):
            raise InvalidField(f"{param}.{key} must be a string", f"{param}.{key}")
    return dict(value)


def _audio(
    audio: Any, s: Settings, changes: dict[str, Any], soft: list[Unsupported], param: str
) -> None:  # fills `changes` and `soft`
    if not isinstance(audio, dict):
        raise InvalidField(f"{param} must be an object", param)
    _unknown(audio, {"input", "output"}, param)
    inp = audio.get("input")
    if inp is not None:
        p = f"{param}.input"
        if not isinstance(inp, dict):
            raise InvalidField(f"{p} must be an object", p)
        _unknown(inp, {"format", "transcription", "noise_reduction", "turn_detection"}, p)
        if "format" in inp:
            changes["input_format"] = parse_format(inp["format"], f"{p}.format")
        if "transcription" in inp:
            changes["transcription"] = _transcription(inp["transcription"], f"{p}.transcription")
        if inp.get("noise_reduction") is not None:
            soft.append(Unsupported("noise_reduction is not supported", f"{p}.noise_reduction"))
        if "turn_detection" in inp:
            changes["turn_detection"] = _turn_detection(
                inp["turn_detection"], s.turn_detection, f"{p}.turn_detection"
            )
    out = audio.get("output")
    if out is not None:
        p = f"{param}.output"
        if not isinstance(out, dict):
            raise InvalidField(f"{p} must be an object", p)
        _unknown(out, {"format", "voice", "speed"}, p)
        if "format" in out:
            changes["output_format"] = parse_format(out["format"], f"{p}.format")
        if "voice" in out:
            voice = out["voice"]
            if isinstance(voice, dict):
                raise Unsupported("custom voices are not supported", f"{p}.voice")
            changes["voice"] = _get(out, "voice", str, f"{p}.voice")
        speed = out.get("speed")
        if speed is not None and speed != 1:
            raise Unsupported("output speed other than 1.0 is not supported", f"{p}.speed")


def update(s: Settings, obj: Any) -> tuple[Settings, list[Unsupported]]:
    """Apply one session.update's `session`: all or nothing (InvalidField /
    Unsupported name the param), except what is refused softly (returned:
    each gets its own `error` while the rest applies, because clients such as
    LiveKit send input transcription with every session.update)."""
    soft: list[Unsupported] = []
    p = "session"
    if not isinstance(obj, dict):
        raise InvalidField("session must be an object", p)
    _unknown(obj, _SESSION_KEYS, p)
    kind = obj.get("type", "realtime")
    if kind == "transcription":
        raise Unsupported("transcription sessions are not supported", "session.type")
    if kind != "realtime":
        raise InvalidField("session.type must be realtime", "session.type")
    refuse_tools(obj, p)
    for key in ("reasoning", "include"):
        if obj.get(key):
            raise Unsupported(f"{key} is not supported", f"{p}.{key}")
    if obj.get("tracing") not in (None, "auto"):
        raise Unsupported("tracing configuration is not supported", "session.tracing")
    if obj.get("truncation") not in (None, "auto", "disabled"):
        raise Unsupported("truncation settings are not supported", "session.truncation")
    changes: dict[str, Any] = {}
    if "instructions" in obj:
        changes["instructions"] = _get(obj, "instructions", str, f"{p}.instructions")
    if "output_modalities" in obj:
        changes["output_modalities"] = _modalities(
            obj["output_modalities"], f"{p}.output_modalities"
        )
    if "max_output_tokens" in obj:
        changes["max_output_tokens"] = _max_tokens(
            obj["max_output_tokens"], f"{p}.max_output_tokens"
        )
    if "audio" in obj:
        _audio(obj["audio"], s, changes, soft, f"{p}.audio")
    return dataclasses.replace(s, **changes), soft


def needs_restart(
    old: Settings, new: Settings, prompt_changed: bool, *, busy: bool, answered: bool
) -> bool:
    """Whether a started session must restart for `new` (on its conversation;
    a new one when the prompt changed); Unsupported when it cannot now."""
    restart = (
        prompt_changed
        or new.input_format != old.input_format
        or new.turn_detection != old.turn_detection
    )
    if restart and busy:
        raise Unsupported(
            "changing instructions, the input format or turn detection "
            "while a response is in progress",
            "session",
        )
    if restart and prompt_changed and answered:
        raise Unsupported(
            "changing instructions once the conversation has begun (a response, or "
            "a message appended; the history is kept as the model's KV cache)",
            "session.instructions",
        )
    return restart


def session_object(s: Settings, session_id: str, model: str) -> dict[str, Any]:
    """The `session` of session.created / session.updated."""
    td = s.turn_detection
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": list(s.output_modalities),
        "instructions": s.instructions,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf" if s.max_output_tokens is None else s.max_output_tokens,
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": 0,
        "include": None,
        "audio": {
            "input": {
                "format": format_object(s.input_format),
                "transcription": s.transcription,
                "noise_reduction": None,
                "turn_detection": None if td is None else td.wire(),
            },
            "output": {"format": format_object(s.output_format), "voice": s.voice, "speed": 1.0},
        },
    }


def session_config(base: SessionConfig, s: Settings) -> SessionConfig:
    """The native SessionConfig of these settings on `base` (the host's, with
    the instructions as system prompt). Manual turns do not use the Session's VAD."""
    td = s.turn_detection
    if td is None:
        return base
    barge = base.barge_in_ms if td.interrupt_response else 0
    if td.type == "server_vad":
        vad = dataclasses.replace(
            base.vad,
            hangover_ms=td.silence_duration_ms,
            preroll_ms=td.prefix_padding_ms,
            aggressiveness=min(3, max(0, round(td.threshold * 3))),
            turn_check=False,  # silence alone, as OpenAI's server_vad
        )
        return dataclasses.replace(base, vad=vad, barge_in_ms=barge)
    threshold = EAGERNESS.get(td.eagerness, base.turn_threshold)
    vad = base.vad
    if not vad.turn_check:  # no end-of-turn model: eagerness scales the hangover
        scale = {"low": 2.0, "high": 0.5}.get(td.eagerness, 1.0)
        vad = dataclasses.replace(vad, hangover_ms=int(vad.hangover_ms * scale))
    return dataclasses.replace(base, vad=vad, barge_in_ms=barge, turn_threshold=threshold)
