"""Wyoming server (Home Assistant's voice protocol): speech to text,
conversation and text to speech on the conversation host (--wyoming).

A thin translation on the process's ConversationHost (voice_agent/host/):
Wyoming events in, host and engine calls out; host events in, Wyoming events
out. It uses the `wyoming` package (the `wyoming` extra) for the events and
the wire format; events are read with bounds (framing.py). Modules:

    server     WyomingServer, running_wyoming: the TCP server, admission,
               zeroconf, metrics
    handler    Connection: one connection's events (the list of what is served)
    framing    bounded event reading, FrameError, Vanished
    audio_in   one audio stream in: formats, conversion to 16 kHz mono (pure)
    asr        transcription: a Qwen2-Audio turn outside any history
    converse   transcript -> handled / not-handled on conversation wyoming:ID
    speak      synthesize -> audio-start, audio-chunk..., audio-stop
    info       the info event (pure)
    discovery  zeroconf _wyoming._tcp (imports zeroconf only when asked)
    stats      counters exported as voice_agent_wyoming_*

Errors are reported with host.report(exc, transport="wyoming") and sent as
Wyoming `error` events {text, code} with errors.py's codes.
"""

from voice_agent.transports.wyoming.audio_in import AudioFormat, AudioIn, audio_format, to_float
from voice_agent.transports.wyoming.converse import (
    DEFAULT_DEVICE,
    OWNER,
    TRANSPORT,
    conversation_id,
    device_of,
)
from voice_agent.transports.wyoming.framing import FrameError, Limits, Vanished, read_event
from voice_agent.transports.wyoming.handler import Connection
from voice_agent.transports.wyoming.info import build_info
from voice_agent.transports.wyoming.server import WyomingServer, running_wyoming
from voice_agent.transports.wyoming.stats import WyomingStats

__all__ = [
    "DEFAULT_DEVICE",
    "OWNER",
    "TRANSPORT",
    "AudioFormat",
    "AudioIn",
    "Connection",
    "FrameError",
    "Limits",
    "Vanished",
    "WyomingServer",
    "WyomingStats",
    "audio_format",
    "build_info",
    "conversation_id",
    "device_of",
    "read_event",
    "running_wyoming",
    "to_float",
]
