"""The devices allowlist file (--devices) the command tests use: one text for
every test, so the MQTT, hub and session tests agree on what exists."""

from __future__ import annotations

from pathlib import Path

DEVICES_TOML = """
[devices."light.kitchen"]
description = "kitchen ceiling light"
actions = ["on", "off"]
brightness = { min = 0, max = 100 }

[devices."climate.living_room"]
set_temperature = { min = 16, max = 28 }
set_mode = { values = ["heat", "cool", "off"] }
"""

DEVICE_NAMES = frozenset({"light.kitchen", "climate.living_room"})


def write_devices(directory: Path, text: str = DEVICES_TOML) -> Path:
    """`directory`/devices.toml holding `text`; its path."""
    path = directory / "devices.toml"
    path.write_text(text)
    return path
