"""Transports: adapters that carry audio and events between clients and LiveSessions.

websocket.py serves the page, /healthz, /readyz, /metrics and /v1/realtime on one port;
webrtc.py and mqtt.py follow. Each one drives `voice_agent.live.LiveSession`.
"""
