"""`voice-agent client`: stream a file or the microphone, print the events,
play and/or save the spoken replies."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any, TextIO

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from voice_agent.audio import FRAME_MS
from voice_agent.client.connection import ClientClosed, RealtimeClient
from voice_agent.client.playback import AudioPlayer, ReplyAudio
from voice_agent.client.printing import EventPrinter
from voice_agent.client.streaming import load_pcm, stream_pcm
from voice_agent.errors import VoiceAgentError
from voice_agent.protocol import (
    ReplyAudioDone,
    ReplyAudioStarted,
    ServerEvent,
)


async def stream_mic(
    client: RealtimeClient, *, max_queued_frames: int = 100, device: int | str | None = None
) -> None:
    """Stream the default microphone (16 kHz mono, 20 ms frames) until cancelled.

    Frames wait in a bounded queue; when the network falls behind, the oldest
    are dropped (counted, reported on stderr at the end).
    """
    try:
        import sounddevice as sd
    except (ImportError, OSError) as exc:
        raise VoiceAgentError(
            "--mic needs the sounddevice package and PortAudio: "
            "pip install 'voice-agent[mic]' (and apt-get install libportaudio2)"
        ) from exc
    loop = asyncio.get_running_loop()
    frames: asyncio.Queue[bytes] = asyncio.Queue(maxsize=max_queued_frames)
    dropped = 0

    def put(data: bytes) -> None:
        nonlocal dropped
        if frames.full():
            frames.get_nowait()
            dropped += 1
        frames.put_nowait(data)

    def callback(indata: Any, n: int, t: Any, status: Any) -> None:
        loop.call_soon_threadsafe(put, bytes(indata))

    stream = sd.RawInputStream(
        samplerate=16000,
        channels=1,
        dtype="int16",
        blocksize=16000 * FRAME_MS // 1000,
        device=device,
        callback=callback,
    )
    try:
        with stream:
            while True:
                await client.send_audio(await frames.get())
    finally:
        if dropped:
            print(f"[{dropped} microphone frames dropped]", file=sys.stderr)


async def run_client(
    url: str,
    file: str | None = None,
    mic: bool = False,
    speed: float = 1.0,
    device: str | None = None,
    *,
    silence_after: float = 1.5,
    system_prompt: str | None = None,
    out: TextIO | None = None,
    token: str | None = None,
    play: bool = False,
    save_reply: str | os.PathLike[str] | None = None,
    output_sample_rate: int = 16000,
) -> int:
    """`voice-agent client`: stream FILE or the microphone, print the events;
    `play` the spoken replies (when an output device opens) and/or save them
    under `save_reply` (see the module doc).

    0 when done; 1 when the server cannot be reached or closes the connection
    unexpectedly. BadAudio (an unreadable file) propagates.
    """
    printer = EventPrinter(out)
    audio = load_pcm(file) if file else None  # fail on a bad file before connecting
    player = AudioPlayer.open(output_sample_rate) if play else None
    spoken = ReplyAudio(save_reply, player) if player is not None or save_reply else None

    def on_event(event: ServerEvent) -> None:
        if spoken is not None:
            spoken.event(event)
        printer(event)

    try:
        async with RealtimeClient(
            url, on_event=on_event, on_audio=spoken.frame if spoken is not None else None
        ) as client:
            await client.start(
                16000,
                1,
                device=device,
                system_prompt=system_prompt,
                token=token,
                speak=None if spoken is not None else False,
                output_sample_rate=output_sample_rate if spoken is not None else None,
            )
            if audio is not None:
                await stream_pcm(client, audio, speed, 0.0, silence_after)
                if not await client.wait_settled():
                    print("timed out waiting for the replies", file=sys.stderr)
                    return 1
                await _wait_for_audio(client, spoken)
            elif mic:
                await stream_mic(client)
    except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as exc:
        print(f"cannot connect to {url}: {exc}", file=sys.stderr)
        return 1
    except ClientClosed as exc:
        print(f"the server closed the connection (code {exc.code})", file=sys.stderr)
        return 1
    except ConnectionClosed as exc:
        code = exc.rcvd.code if exc.rcvd is not None else None
        print(f"the server closed the connection (code {code})", file=sys.stderr)
        return 1
    finally:
        if spoken is not None:
            spoken.close()
    return 0


async def _wait_for_audio(
    client: RealtimeClient, spoken: ReplyAudio | None, timeout: float = 120.0
) -> None:
    """After the last reply: wait for its audio to end (every reply.audio.started
    answered by reply.audio.done) and, when playing, for the buffer to play out."""
    if spoken is None:
        return
    deadline = time.monotonic() + timeout

    def open_audio() -> bool:
        started = {e.reply_id for e in client.of_type(ReplyAudioStarted)}
        done = {e.reply_id for e in client.of_type(ReplyAudioDone)}
        return bool(started - done)

    while time.monotonic() < deadline and not client.ended:
        player = spoken.player
        if not open_audio() and (player is None or player.buffered_ms == 0):
            return
        await asyncio.sleep(0.05)
