"""The smart-speaker reference client, also the client library the tests use.

    async with RealtimeClient(url) as client:
        started = await client.start(sample_rate=16000)
        await client.send_audio(pcm)
        done = await client.wait_for(ReplyDone, timeout=30)

`stream_file` streams an audio file in 20 ms PCM16 frames at real-time pace
(divided by `speed`; 0 sends as fast as possible) and prints the events as they
arrive: one line per event, reply deltas inline as they stream. `run_client`
is what `voice-agent client` calls.

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

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
import time
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO, TypeVar

import numpy as np
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from voice_agent.audio import decode, float_to_pcm16, read_wav_pcm16
from voice_agent.errors import VoiceAgentError
from voice_agent.protocol import (
    ErrorEvent,
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SessionStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    decode_server,
    encode,
)

E = TypeVar("E")
EventCallback = Callable[[ServerEvent], object]
AudioCallback = Callable[[bytes], object]

logger = logging.getLogger("voice_agent.client")

FRAME_MS = 20


class ClientClosed(Exception):
    """The connection closed while waiting for an event; `code` is the close code."""

    def __init__(self, code: int | None) -> None:
        super().__init__(f"connection closed (code {code})")
        self.code = code


class RealtimeClient:
    """One realtime WebSocket session. Use as an async context manager."""

    def __init__(
        self,
        url: str,
        *,
        on_event: EventCallback | None = None,
        open_timeout: float = 10.0,
        max_size: int | None = 16 * 2**20,
        on_audio: AudioCallback | None = None,
    ) -> None:
        self.url = url
        self.on_event = on_event
        self.on_audio = on_audio  # each binary frame (reply audio), in order with the events
        self.open_timeout = open_timeout
        self.max_size = max_size
        self.received: list[ServerEvent] = []  # every event, in arrival order
        self.audio_bytes = 0  # server-to-client binary frames (spoken replies)
        self.text_turns_sent = 0
        self.session: SessionStarted | None = None
        self._ws: ClientConnection | None = None
        self._queue: asyncio.Queue[ServerEvent | None] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._eof = False

    # -- connection -------------------------------------------------------

    async def connect(self) -> RealtimeClient:
        self._ws = await ws_connect(
            self.url, open_timeout=self.open_timeout, max_size=self.max_size
        )
        self._reader = asyncio.create_task(self._read())
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)

    async def __aenter__(self) -> RealtimeClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def ws(self) -> ClientConnection:
        if self._ws is None:
            raise RuntimeError("not connected")
        return self._ws

    @property
    def close_code(self) -> int | None:
        """The close code the server sent (None while open)."""
        return None if self._ws is None else self._ws.close_code

    async def wait_closed(self, timeout: float = 30.0) -> int | None:
        """Wait for the connection to close; its close code."""
        await asyncio.wait_for(self.ws.wait_closed(), timeout)
        return self.close_code

    async def _read(self) -> None:
        ws = self.ws
        try:
            async for message in ws:
                if isinstance(message, bytes):
                    self.audio_bytes += len(message)
                    if self.on_audio is not None:
                        self.on_audio(message)
                    continue
                event = decode_server(message)
                self.received.append(event)
                if isinstance(event, SessionStarted):
                    self.session = event
                if self.on_event is not None:
                    self.on_event(event)
                self._queue.put_nowait(event)
                self._changed.set()
        except ConnectionClosed:
            pass
        finally:
            self._eof = True
            self._queue.put_nowait(None)
            self._changed.set()

    # -- sending ----------------------------------------------------------

    async def send_json(self, obj: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(obj))

    async def send_raw(self, data: str | bytes) -> None:
        """Send any frame as is (tests of malformed input)."""
        await self.ws.send(data)

    async def start(
        self, sample_rate: int = 16000, channels: int = 1, timeout: float = 30.0, **fields: Any
    ) -> SessionStarted:
        """session.start (extra fields: system_prompt, device, ...); the answer."""
        await self.send_json(
            {
                "type": "session.start",
                "sample_rate": sample_rate,
                "channels": channels,
                "format": "pcm16",
                **{k: v for k, v in fields.items() if v is not None},
            }
        )
        return await self.wait_for(SessionStarted, timeout)

    async def send_audio(self, pcm: bytes) -> None:
        await self.ws.send(pcm)

    async def send_text(self, text: str) -> None:
        self.text_turns_sent += 1
        await self.send_json({"type": "text", "text": text})

    async def commit(self) -> None:
        await self.send_json({"type": "audio.commit"})

    async def cancel(self) -> None:
        await self.send_json({"type": "cancel"})

    # -- receiving --------------------------------------------------------

    async def next_event(self, timeout: float = 30.0) -> ServerEvent:
        """The next event not consumed yet; ClientClosed at the end."""
        if self._eof and self._queue.empty():
            raise ClientClosed(self.close_code)
        event = await asyncio.wait_for(self._queue.get(), timeout)
        if event is None:
            self._queue.put_nowait(None)  # keep the end marker for later calls
            raise ClientClosed(self.close_code)
        return event

    async def events(self) -> AsyncIterator[ServerEvent]:
        """Events as they arrive until the connection closes."""
        while True:
            try:
                yield await self.next_event(timeout=3600.0)
            except ClientClosed:
                return

    async def wait_for(
        self,
        kind: type[E],
        timeout: float = 30.0,
        where: Callable[[E], bool] | None = None,
    ) -> E:
        """Consume events until one of type `kind` (matching `where`) arrives.

        Skipped events stay in `received`. TimeoutError after `timeout` seconds
        in all; ClientClosed if the connection closes first.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {_name(kind)} within {timeout:g} s")
            try:
                event = await self.next_event(left)
            except TimeoutError:
                raise TimeoutError(f"no {_name(kind)} within {timeout:g} s") from None
            if isinstance(event, kind) and (where is None or where(event)):
                return event

    def of_type(self, kind: type[E]) -> list[E]:
        """Received events of one type, in order."""
        return [e for e in self.received if isinstance(e, kind)]

    def settled(self) -> bool:
        """Nothing in progress: no open utterance, every reply ended and every
        closed utterance and text turn got a reply (or was dropped as busy)."""
        opened: set[str] = set()
        stopped = 0
        started: set[str] = set()
        ended: set[str] = set()
        dropped = 0
        for e in self.received:
            if isinstance(e, SpeechStartedEvent):
                opened.add(e.utterance_id)
            elif isinstance(e, SpeechStoppedEvent):
                opened.discard(e.utterance_id)
                stopped += 1
            elif isinstance(e, ReplyStarted):
                started.add(e.reply_id)
            elif isinstance(e, ReplyDone | ReplyCancelled):
                ended.add(e.reply_id)
            elif isinstance(e, ErrorEvent):
                if e.reply_id is not None:
                    ended.add(e.reply_id)
                elif e.code == "busy":
                    dropped += 1
        return (
            not opened
            and started <= ended
            and len(started) + dropped >= stopped + self.text_turns_sent
        )

    async def wait_settled(self, timeout: float = 120.0, quiet: float = 0.5) -> bool:
        """Wait until `settled()` has held for `quiet` seconds without a new
        event, or the connection closed; False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._eof:
                return self.settled()
            self._changed.clear()
            if self.settled():
                try:
                    await asyncio.wait_for(self._changed.wait(), quiet)
                except TimeoutError:
                    return True
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._changed.wait(), max(0.01, min(1.0, deadline - time.monotonic()))
                )
        return False


def connect(url: str, **kwargs: Any) -> RealtimeClient:
    """`async with connect(url) as client:`."""
    return RealtimeClient(url, **kwargs)


# ------------------------------------------------------------------ printing


class EventPrinter:
    """One line per event; reply deltas inline as they stream."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out if out is not None else sys.stdout
        self._inline: str | None = None  # reply id being printed inline

    def __call__(self, event: ServerEvent) -> None:
        out = self.out
        if isinstance(event, ReplyDelta):
            if self._inline != event.reply_id:
                self._end_line()
                out.write(f"reply {event.reply_id}: ")
                self._inline = event.reply_id
            out.write(event.text)
            out.flush()
            return
        self._end_line()
        out.write(self.format(event) + "\n")
        out.flush()

    def _end_line(self) -> None:
        if self._inline is not None:
            self.out.write("\n")
            self._inline = None

    @staticmethod
    def format(event: ServerEvent) -> str:
        if isinstance(event, SessionStarted):
            demo = " [DEMO MODEL: replies are random noise]" if event.demo_model else ""
            return f"session.started {event.session_id} model={event.model}{demo}"
        if isinstance(event, SpeechStartedEvent):
            return f"speech.started {event.utterance_id} at {event.start_ms} ms"
        if isinstance(event, SpeechStoppedEvent):
            return (
                f"speech.stopped {event.utterance_id} {event.start_ms}-{event.end_ms} ms"
                f" ({event.reason or 'silence'})"
            )
        if isinstance(event, ReplyStarted):
            return f"reply.started {event.reply_id} for {event.utterance_id or 'text'}"
        if isinstance(event, ReplyDone):
            tokens = event.usage.get("completion_tokens", 0)
            ttft = event.timing.get("ttft_ms", 0.0)
            return f"reply.done {event.reply_id} ({tokens} tokens, first after {ttft:.0f} ms)"
        if isinstance(event, ReplyCancelled):
            return f"reply.cancelled {event.reply_id} ({event.reason})"
        if isinstance(event, ReplyAudioStarted):
            return f"reply.audio.started {event.reply_id} ({event.sample_rate} Hz)"
        if isinstance(event, ReplyAudioDone):
            cut = ", cut off" if event.cancelled else ""
            return f"reply.audio.done {event.reply_id} ({event.duration_ms} ms{cut})"
        if isinstance(event, ErrorEvent):
            return f"error {event.code}: {event.message}"
        return encode(event)


def print_event(event: ServerEvent) -> None:
    """The default printer for stdout."""
    _STDOUT_PRINTER(event)


_STDOUT_PRINTER = EventPrinter()


# ---------------------------------------------------------------- streaming


@dataclass
class PcmAudio:
    """Interleaved PCM16 with its rate and channel count."""

    pcm: bytes
    sample_rate: int = 16000
    channels: int = 1
    frame_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.frame_bytes = 2 * self.channels * self.sample_rate * FRAME_MS // 1000

    @property
    def duration_s(self) -> float:
        return len(self.pcm) / (2 * self.channels * self.sample_rate)

    def silence(self, seconds: float) -> bytes:
        return bytes(2 * self.channels * round(seconds * self.sample_rate))


def load_pcm(path: str | os.PathLike[str], raw: bool = False) -> PcmAudio:
    """A file as 16 kHz mono PCM16 (decoded and resampled), or with `raw` as it
    is: its own rate and channels (WAV/FLAC/OGG that soundfile reads)."""
    if raw:
        pcm, rate, channels = read_wav_pcm16(path)
        return PcmAudio(pcm, rate, channels)
    return PcmAudio(float_to_pcm16(decode(path)))


def pcm16_mono(audio: np.ndarray[Any, Any]) -> PcmAudio:
    """16 kHz mono float32 audio as PcmAudio."""
    return PcmAudio(float_to_pcm16(np.asarray(audio, dtype=np.float32)))


async def send_paced(
    client: RealtimeClient, audio: PcmAudio, pcm: bytes | None = None, speed: float = 1.0
) -> None:
    """Send `pcm` (default: audio.pcm) in 20 ms frames; real time divided by
    `speed`, or as fast as possible when speed is 0. The pace follows the
    clock, so slow sends do not make the stream drift."""
    data = audio.pcm if pcm is None else pcm
    step = audio.frame_bytes
    frame_s = FRAME_MS / 1000.0
    began = time.monotonic()
    for n, offset in enumerate(range(0, len(data), step)):
        await client.send_audio(data[offset : offset + step])
        if speed > 0:
            due = began + (n + 1) * frame_s / speed
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        elif n % 50 == 49:
            await asyncio.sleep(0)  # let the reader run


async def stream_file(
    url: str,
    path: str | os.PathLike[str],
    speed: float = 1.0,
    silence_before: float = 0.0,
    silence_after: float = 1.5,
    on_event: EventCallback | None = print_event,
    *,
    raw: bool = False,
    reply_timeout: float = 120.0,
    **session_fields: Any,
) -> list[ServerEvent]:
    """Stream one file (see module doc) and wait for its replies; every event.

    Events go to `on_event` as they arrive (default: printed on stdout; None:
    not at all). `raw` sends the file at its own rate and channels (WAV/FLAC) instead of
    16 kHz mono. An utterance still open at the end is committed.
    """
    audio = load_pcm(path, raw=raw)
    async with RealtimeClient(url, on_event=on_event) as client:
        await client.start(audio.sample_rate, audio.channels, **session_fields)
        await stream_pcm(client, audio, speed, silence_before, silence_after)
        await client.wait_settled(reply_timeout)
        return list(client.received)


async def stream_pcm(
    client: RealtimeClient,
    audio: PcmAudio,
    speed: float = 1.0,
    silence_before: float = 0.0,
    silence_after: float = 1.5,
) -> None:
    """Send silence, the audio, silence; commit an utterance left open."""
    pcm = audio.silence(silence_before) + audio.pcm + audio.silence(silence_after)
    await send_paced(client, audio, pcm, speed)
    if _open_utterance(client):
        await client.commit()


def _open_utterance(client: RealtimeClient) -> bool:
    opened: set[str] = set()
    for e in client.received:
        if isinstance(e, SpeechStartedEvent):
            opened.add(e.utterance_id)
        elif isinstance(e, SpeechStoppedEvent):
            opened.discard(e.utterance_id)
    return bool(opened)


# ------------------------------------------------------------ spoken replies


class AudioPlayer:
    """Plays PCM16 mono through sounddevice's output as it arrives.

    PortAudio pulls from a buffer on its own thread; an empty buffer plays
    silence. The buffer holds at most `max_buffered_s` (the server paces its
    audio, so it stays near its lead); beyond it the oldest audio is dropped.
    `clear()` drops what is buffered (a cancelled reply stops at once).
    """

    def __init__(self, stream: Any, sample_rate: int, max_buffered_s: float = 30.0) -> None:
        self.stream = stream
        self.sample_rate = sample_rate
        self._max_bytes = 2 * int(sample_rate * max_buffered_s)
        self._buf = bytearray()
        self._lock = threading.Lock()
        self.dropped_bytes = 0

    @classmethod
    def open(cls, sample_rate: int = 16000, device: int | str | None = None) -> AudioPlayer | None:
        """A started player, or None (logged once) when sounddevice, PortAudio or
        an output device is missing: the client then goes on without sound."""
        try:
            import sounddevice as sd
        except (ImportError, OSError) as exc:
            logger.warning(
                "reply audio is not played: sounddevice/PortAudio unavailable (%s); "
                "pip install 'voice-agent[mic]'",
                type(exc).__name__,
            )
            return None
        player: AudioPlayer | None = None

        def callback(outdata: Any, frames: int, t: Any, status: Any) -> None:
            assert player is not None
            player._fill(outdata, frames)

        try:
            stream = sd.RawOutputStream(
                samplerate=sample_rate,
                channels=1,
                dtype="int16",
                blocksize=sample_rate * FRAME_MS // 1000,
                device=device,
                callback=callback,
            )
            player = cls(stream, sample_rate)
            stream.start()
        except Exception as exc:  # sd.PortAudioError, ValueError: no usable device
            logger.warning("reply audio is not played: no audio output (%s)", exc)
            return None
        return player

    def _fill(self, outdata: Any, frames: int) -> None:
        want = 2 * frames
        with self._lock:
            chunk = bytes(self._buf[:want])
            del self._buf[:want]
        outdata[: len(chunk)] = chunk
        if len(chunk) < want:
            outdata[len(chunk) :] = bytes(want - len(chunk))

    def write(self, pcm: bytes) -> None:
        with self._lock:
            self._buf += pcm
            over = len(self._buf) - self._max_bytes
            if over > 0:
                over += over % 2
                del self._buf[:over]
                self.dropped_bytes += over

    def clear(self) -> None:
        with self._lock:
            self._buf.clear()

    @property
    def buffered_ms(self) -> int:
        with self._lock:
            return len(self._buf) * 1000 // (2 * self.sample_rate)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.stop()
            self.stream.close()


class ReplyAudio:
    """Each reply's spoken audio: played and/or saved (see the module doc).

    Feed it every event (`event`) and binary frame (`frame`) in arrival order;
    `close()` saves a reply whose audio never ended (as cut off).
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] | None = None,
        player: AudioPlayer | None = None,
        *,
        device: int | str | None = None,
    ) -> None:
        self.save_dir = Path(save_dir) if save_dir is not None else None
        if self.save_dir is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
        self.player = player
        self.device = device
        self.saved: list[Path] = []  # files written, in order
        self._reply: str | None = None
        self._rate = 16000
        self._pcm = bytearray()

    def event(self, event: ServerEvent) -> None:
        if isinstance(event, ReplyAudioStarted):
            self._finish(cancelled=True)  # a reply whose done never came
            self._reply, self._rate = event.reply_id, event.sample_rate
            self._pcm = bytearray()
            if self.player is not None and self.player.sample_rate != event.sample_rate:
                self.player.close()
                self.player = AudioPlayer.open(event.sample_rate, self.device)
        elif isinstance(event, ReplyAudioDone) and event.reply_id == self._reply:
            if event.cancelled and self.player is not None:
                self.player.clear()
            self._finish(cancelled=event.cancelled)
        elif (
            isinstance(event, ReplyCancelled)
            and event.reply_id == self._reply
            and self.player is not None
        ):
            self.player.clear()  # what is buffered is not heard

    def frame(self, pcm: bytes) -> None:
        if self._reply is None:
            return  # not between reply.audio.started and reply.audio.done
        if self.save_dir is not None:
            self._pcm += pcm
        if self.player is not None:
            self.player.write(pcm)

    def close(self) -> None:
        self._finish(cancelled=True)
        if self.player is not None:
            self.player.close()
            self.player = None

    def _finish(self, cancelled: bool) -> None:
        reply, self._reply = self._reply, None
        if reply is None or self.save_dir is None:
            return
        name = f"{reply}.cancelled.wav" if cancelled else f"{reply}.wav"
        path = self.save_dir / name
        with wave.open(str(path), "wb") as out:
            out.setnchannels(1)
            out.setsampwidth(2)
            out.setframerate(self._rate)
            out.writeframes(bytes(self._pcm))
        self._pcm = bytearray()
        self.saved.append(path)


# ----------------------------------------------------------------------- mic


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

    while time.monotonic() < deadline and not client._eof:
        player = spoken.player
        if not open_audio() and (player is None or player.buffered_ms == 0):
            return
        await asyncio.sleep(0.05)


def _name(kind: object) -> str:
    return getattr(kind, "__name__", None) or str(kind)
