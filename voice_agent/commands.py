"""Home-automation commands: the device allowlist, the prompt text, parsing (pure).

The allowlist comes from a TOML file (`--devices FILE`), parsed by
`parse_devices(text)`; one table per target, keyed by its name:

    [devices."light.kitchen"]
    description = "kitchen ceiling light"
    actions = ["on", "off"]                       # actions without a value
    brightness = { min = 0, max = 100 }           # a number in a range (ints: integer)

    [devices."climate.living_room"]
    set_temperature = { min = 16, max = 28 }
    set_mode = { values = ["heat", "cool", "off"] }   # one of these strings

`prompt_text(devices, base)` is the system prompt: `base` (or the model's usual
one) followed by the list and the one strict format the model must use, one
command per line:

    <command>{"action": "off", "target": "light.kitchen"}</command>

`parse_commands(text, devices)` finds those tags in a reply and validates each:
a JSON object with exactly `action`, `target` and (when the action takes one)
`value`; the target and action in the allowlist; the value of the right kind and
in range. Anything else is rejected with a reason (counted by callers, never
published). At most MAX_COMMANDS per reply are accepted. Nothing here chooses
a topic: transports build topics from their prefix, the requesting device and
fixed suffixes only.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeGuard

from voice_agent.errors import ConfigError

MAX_COMMANDS = 16  # per reply; the rest are rejected as "too_many"
MAX_COMMAND_CHARS = 512  # longer bodies are rejected as "too_long"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

DEVICE_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # MQTT topic level of a requesting device
TARGET_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # e.g. light.kitchen (payload only)
ACTION_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")
_TAG = re.compile(r"<command>(.*?)</command>", re.DOTALL)

Value = str | int | float | None


def valid_device_name(name: str) -> bool:
    """True when `name` may be an MQTT topic level for a device: [A-Za-z0-9_-]{1,64}."""
    return isinstance(name, str) and DEVICE_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class ActionSpec:
    """One allowed action. kind: "none" (no value), "number" (min..max; integer
    when both bounds are integers) or "choice" (one of `choices`)."""

    name: str
    kind: str = "none"
    min: float | None = None
    max: float | None = None
    integer: bool = False
    choices: tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "number":
            what = "an integer" if self.integer else "a number"
            return f"{self.name} (value: {what} from {_num(self.min)} to {_num(self.max)})"
        if self.kind == "choice":
            return f"{self.name} (value: one of {', '.join(self.choices)})"
        return self.name


@dataclass(frozen=True)
class DeviceSpec:
    target: str
    description: str
    actions: Mapping[str, ActionSpec]


@dataclass(frozen=True)
class DeviceList:
    """The allowlist: targets and the actions allowed on each."""

    devices: Mapping[str, DeviceSpec]

    def __len__(self) -> int:
        return len(self.devices)


@dataclass(frozen=True)
class Command:
    action: str
    target: str
    value: Value = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"action": self.action, "target": self.target}
        if self.value is not None:
            out["value"] = self.value
        return out


@dataclass(frozen=True)
class Rejection:
    reason: str  # bad_json | bad_fields | unknown_target | unknown_action | bad_value |
    #              out_of_range | too_long | too_many


@dataclass(frozen=True)
class Parsed:
    commands: tuple[Command, ...]
    rejected: tuple[Rejection, ...]


# ---------------------------------------------------------------- the devices file


def parse_devices(text: str) -> DeviceList:
    """Parse the devices TOML (see the module doc); ConfigError names the problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"devices file is not valid TOML: {exc}") from None
    table = data.get("devices")
    if not isinstance(table, dict) or not table:
        raise ConfigError('devices file needs a [devices."NAME"] table for each device')
    devices: dict[str, DeviceSpec] = {}
    for target, body in table.items():
        if not TARGET_NAME.fullmatch(target):
            raise ConfigError(f"device name {target!r} must match [A-Za-z0-9_.:-]{{1,128}}")
        if not isinstance(body, dict):
            raise ConfigError(f"device {target}: expected a table")
        devices[target] = _device(target, body)
    return DeviceList(devices)


def _device(target: str, body: dict[str, Any]) -> DeviceSpec:
    description = body.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"device {target}: description must be a string")
    actions: dict[str, ActionSpec] = {}
    plain = body.get("actions", [])
    if not isinstance(plain, list) or not all(isinstance(a, str) for a in plain):
        raise ConfigError(f"device {target}: actions must be a list of names")
    for name in plain:
        actions[name] = ActionSpec(name)
    for name, spec in body.items():
        if name in ("description", "actions"):
            continue
        if not isinstance(spec, dict):
            raise ConfigError(f"device {target}: {name} must be a table like {{min = 0, max = 1}}")
        actions[name] = _action(target, name, spec)
    for name in actions:
        if not ACTION_NAME.fullmatch(name):
            raise ConfigError(f"device {target}: action {name!r} must match [A-Za-z0-9_]{{1,64}}")
    if not actions:
        raise ConfigError(f"device {target}: no actions")
    return DeviceSpec(target, description, actions)


def _action(target: str, name: str, spec: dict[str, Any]) -> ActionSpec:
    where = f"device {target}, action {name}"
    unknown = set(spec) - {"min", "max", "values"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    if "values" in spec:
        values = spec["values"]
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) for v in values)
        ):
            raise ConfigError(f"{where}: values must be a non-empty list of strings")
        return ActionSpec(name, "choice", choices=tuple(values))
    if "min" in spec or "max" in spec:
        lo, hi = spec.get("min"), spec.get("max")
        if not (_is_number(lo) and _is_number(hi)) or lo > hi:
            raise ConfigError(f"{where}: needs numbers min <= max")
        integer = isinstance(lo, int) and isinstance(hi, int)
        return ActionSpec(name, "number", float(lo), float(hi), integer)
    return ActionSpec(name)


def _is_number(v: object) -> TypeGuard[int | float]:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _num(v: float | None) -> str:
    if v is None:
        return "?"
    return str(int(v)) if float(v).is_integer() else str(v)


# ------------------------------------------------------------------ the prompt


def prompt_text(devices: DeviceList, base: str | None = None) -> str:
    """The system prompt: `base` (default: the model's usual one), the devices,
    and the strict command format."""
    lines = [base or DEFAULT_SYSTEM_PROMPT, "", "You can control these home devices:"]
    for d in devices.devices.values():
        about = f" ({d.description})" if d.description else ""
        acts = "; ".join(a.describe() for a in d.actions.values())
        lines.append(f"- {d.target}{about}: {acts}")
    lines += [
        "",
        "To control a device, write each command on its own line, exactly like this:",
        '<command>{"action": "ACTION", "target": "DEVICE", "value": VALUE}</command>',
        'Leave out "value" when the action takes none. Use only the devices and actions '
        "listed above. Then tell the user briefly what you did.",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------- parsing


def parse_commands(text: str, devices: DeviceList) -> Parsed:
    """Every <command>...</command> in `text`, validated (see the module doc)."""
    commands: list[Command] = []
    rejected: list[Rejection] = []
    for match in _TAG.finditer(text):
        result = _validate(match.group(1), devices)
        if isinstance(result, Rejection):
            rejected.append(result)
        elif len(commands) >= MAX_COMMANDS:
            rejected.append(Rejection("too_many"))
        else:
            commands.append(result)
    return Parsed(tuple(commands), tuple(rejected))


def _validate(body: str, devices: DeviceList) -> Command | Rejection:
    if len(body) > MAX_COMMAND_CHARS:
        return Rejection("too_long")
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return Rejection("bad_json")
    if not isinstance(obj, dict):
        return Rejection("bad_json")
    if not {"action", "target"} <= set(obj) <= {"action", "target", "value"}:
        return Rejection("bad_fields")
    action, target = obj["action"], obj["target"]
    if not isinstance(action, str) or not isinstance(target, str):
        return Rejection("bad_fields")
    device = devices.devices.get(target)
    if device is None:
        return Rejection("unknown_target")
    spec = device.actions.get(action)
    if spec is None:
        return Rejection("unknown_action")
    value = obj.get("value")
    if spec.kind == "none":
        return Command(action, target) if value is None else Rejection("bad_value")
    if spec.kind == "choice":
        if not isinstance(value, str):
            return Rejection("bad_value")
        return (
            Command(action, target, value) if value in spec.choices else Rejection("out_of_range")
        )
    if not _is_number(value):
        return Rejection("bad_value")
    number = float(value)
    assert spec.min is not None and spec.max is not None
    if spec.integer and not number.is_integer():
        return Rejection("bad_value")
    if not spec.min <= number <= spec.max:
        return Rejection("out_of_range")
    return Command(action, target, int(number) if spec.integer else number)
