"""Transports: thin adapters between a wire and the conversation host (voice_agent/host/).

websocket/ serves the page, /healthz, /readyz, /metrics and the native
/v1/realtime protocol on one port, on the sans-I/O WebSocket server of
sansio/; webrtc.py (with ice.py and reply_track.py) carries a session's audio
over a peer connection negotiated on that socket; mqtt/ serves
home-automation requests. Each translates its wire to host calls
(ConversationHost) and the host's events to its wire.
"""
