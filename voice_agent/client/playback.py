"""Spoken replies: AudioPlayer (sounddevice output) and ReplyAudio (each
reply's audio played and/or saved as WAV; see the package doc)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import wave
from pathlib import Path
from typing import Any

from voice_agent.audio import FRAME_MS
from voice_agent.protocol import (
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ServerEvent,
)

logger = logging.getLogger("voice_agent.client")


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
