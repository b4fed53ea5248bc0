"""Moved to tests.helpers.speech (kept until every importer has switched)."""

from tests.helpers.speech import as_pcm16, voiced_fraction

__all__ = ["as_pcm16", "voiced_fraction"]
