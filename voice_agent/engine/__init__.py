"""Inference engines: one per process, shared by every session."""
