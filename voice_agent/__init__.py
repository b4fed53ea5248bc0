"""voice_agent: a self-hosted real-time voice assistant server around Qwen2-Audio."""

__version__ = "0.1.0"
