"""Where things are: the checkout and the shared test recordings."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The checkout (the directory holding voice_agent/ and tests/)."""

AUDIO_DIR = ROOT.parent / "shared" / "audio"
"""../shared/audio: real recordings for tests (see its README.md)."""
