"""The OpenAI Realtime API (GA) on the conversation host: one more thin transport.

translator.py (pure, sans-I/O) turns GA client events into host calls and
GA events, and the session's native events into GA server events; events.py
parses and validates client events, settings.py the session object,
responses.py the response events, items.py ids and conversation items,
codec.py base64, G.711 and the formats. connection.py is the glue on one
WebSocket. The server routes a WebSocket to /v1/realtime that carries a
`model` query parameter here (transports/websocket/app.py); what is
supported, mapped and refused: docs/openai-realtime.md.
"""

from voice_agent.transports.openai_realtime.connection import TRANSPORT, RealtimeConnection
from voice_agent.transports.openai_realtime.translator import Translator

__all__ = ["TRANSPORT", "RealtimeConnection", "Translator"]
