"""Reproducible benchmarks that print JSON (run as scripts or `voice-agent bench NAME`)."""
