"""Tests of voice_agent/session/: the turn state machine driven with real speech."""
