"""The smart-speaker reference client, also the client library the tests use.

    async with RealtimeClient(url) as client:
        started = await client.start(sample_rate=16000)
        await client.send_audio(pcm)
        done = await client.wait_for(ReplyDone, timeout=30)

`stream_file` streams an audio file in 20 ms PCM16 frames at real-time pace
(divided by `speed`; 0 sends as fast as possible) and prints the events as they
arrive: one line per event, reply deltas inline as they stream. `run_client`
is what `voice-agent client` calls.

    connection.py  RealtimeClient
    printing.py    EventPrinter
    streaming.py   PcmAudio, load_pcm, send_paced, stream_file, stream_pcm
    playback.py    AudioPlayer, ReplyAudio (spoken replies)
    run.py         run_client, stream_mic

Spoken replies (`ReplyAudio`): the binary frames between reply.audio.started
and reply.audio.done are played as they come through sounddevice (the `mic`
extra) when `play` is set and an output device opens (otherwise one log line
says why and nothing is played), and/or saved with `save_dir` as
DIR/<reply_id>.wav (16-bit mono at the announced rate), written when the
reply's audio ends; a reply whose audio was cut off (cancel, barge-in, the
connection closing) is saved as DIR/<reply_id>.cancelled.wav with what
arrived. Reply ids restart at r1 in each session, so a later session
overwrites the files of an earlier one in the same DIR. A client that
neither plays nor saves asks the server not to speak (`speak: false`).
"""

from voice_agent.audio import FRAME_MS
from voice_agent.client.connection import (
    AudioCallback,
    ClientClosed,
    EventCallback,
    RealtimeClient,
    connect,
)
from voice_agent.client.playback import AudioPlayer, ReplyAudio
from voice_agent.client.printing import EventPrinter, print_event
from voice_agent.client.run import run_client, stream_mic
from voice_agent.client.streaming import (
    PcmAudio,
    load_pcm,
    pcm16_mono,
    send_paced,
    stream_file,
    stream_pcm,
)

__all__ = [
    "FRAME_MS",
    "AudioCallback",
    "AudioPlayer",
    "ClientClosed",
    "EventCallback",
    "EventPrinter",
    "PcmAudio",
    "RealtimeClient",
    "ReplyAudio",
    "connect",
    "load_pcm",
    "pcm16_mono",
    "print_event",
    "run_client",
    "send_paced",
    "stream_file",
    "stream_mic",
    "stream_pcm",
]
