"""WebRTC audio input (aiortc), negotiated over the realtime WebSocket.

A client that sends `webrtc.offer` on its WebSocket gets one `WebRTCInput`: an
RTCPeerConnection that answers the offer (`webrtc.answer`), receives the
client's audio track (Opus, decoded by aiortc to 48 kHz stereo s16 frames),
converts it with av's resampler to PCM16 at the rate and channel count the
session declared in `session.start`, and feeds it to the LiveSession exactly
as binary WebSocket frames would be fed. Events stay on the WebSocket.

No trickle ICE: the protocol has no message for candidates, so the offer must
carry its candidates (the client waits for ICE gathering to complete before
sending it) and the answer is sent once the server's own gathering completed.

Flow and bounds: a reader task pulls frames off the track as they arrive (so
aiortc's own unbounded frame queue stays empty) and puts the converted PCM in
a bounded queue (`MAX_QUEUED_FRAMES`, about 2 s of 20 ms frames); a feeder task
awaits `live.feed_audio` for each. When the feeder falls behind, the oldest
chunk is dropped and counted (`dropped_frames`, logged).

Spoken replies (`speak=True`, a session whose replies are spoken): when the
offer's first audio m-line can receive (sendrecv or recvonly), the answer
sends on it too, carrying a `ReplyTrack` (reply_track.py: paced 20 ms frames
of 48 kHz mono, silence between replies); the transport writes the speaker's
PCM into `reply_track` instead of sending binary frames. Otherwise (the
session is silent, or the offer cannot receive) that m-line is answered
recvonly and there is no track. Other m-lines (video, extra audio) are
answered inactive.

ICE (transports/ice.py): host candidates follow the server's bind address
(a loopback-bound server uses and keeps loopback candidates only; a browser
on the same machine must then offer loopback candidates: Chromium does with
`--allow-loopback-in-peer-connection`, and real addresses rather than mDNS
names with `--disable-features=WebRtcHideLocalIpsWithMdns`); STUN/TURN
servers come from `--ice-server` only, checked at startup.

Errors: an offer that cannot be used (not SDP, no audio m-line, no usable
candidate, no DTLS fingerprint, or refused by aiortc) is a BadMessage
"invalid webrtc offer: REASON"; the peer connection is then closed and the
WebSocket stays open. When the client closes its side, or ICE/DTLS fails, the
peer connection is released at once (the WebSocket stays open and may offer
again).

Teardown (`close`): stop the reply track, cancel and await the reader and
feeder, remove the event handlers, stop the incoming track, await
`pc.close()` (which stops the transceivers and the ICE/DTLS transports), and
drop every reference: aiortc is known to keep memory alive after disconnects
otherwise. When the client closes its side
(or ICE/DTLS fails) the peer connection is closed first and the audio already
received still reaches the session, then the open utterance is closed as by
`audio.commit` (see `_close`); the session itself goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import av
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.exceptions import InvalidAccessError, InvalidStateError, OperationError
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription

from voice_agent.errors import BadMessage
from voice_agent.live import LiveSession
from voice_agent.transports.ice import (
    ICE_SCHEMES,
    IceServer,
    host_addresses_for_bind,
    host_candidates,
    install_host_address_hook,
    keep_candidates,
    loopback_candidates,
    parse_ice_server,
    parse_ice_servers,
    rtc_configuration,
)
from voice_agent.transports.reply_track import ReplyTrack

logger = logging.getLogger("voice_agent.transports.webrtc")

MAX_QUEUED_FRAMES = 100  # about 2 s of 20 ms frames between the track and the session
INVALID_OFFER = "invalid webrtc offer"
DRAIN_SECONDS = 2.0  # what a closing client's last audio may take to reach the session

__all__ = [  # the ICE names stay importable from here (they live in ice.py)
    "DRAIN_SECONDS",
    "ICE_SCHEMES",
    "INVALID_OFFER",
    "MAX_QUEUED_FRAMES",
    "IceServer",
    "WebRTCInput",
    "host_addresses_for_bind",
    "host_candidates",
    "install_host_address_hook",
    "keep_candidates",
    "loopback_candidates",
    "parse_ice_server",
    "parse_ice_servers",
    "rtc_configuration",
]

# -- the peer connection ----------------------------------------------------------


class WebRTCInput:
    """The WebRTC audio input of one session; see the module doc.

    `accept(offer_sdp)` returns the answer SDP; `close()` releases everything
    (idempotent).
    """

    def __init__(
        self,
        live: LiveSession,
        *,
        sample_rate: int = 16000,
        channels: int = 1,
        ice_servers: Sequence[str] = (),
        host_addresses: tuple[str, ...] | None = None,
        max_queued_frames: int = MAX_QUEUED_FRAMES,
        speak: bool = False,
    ) -> None:
        self.live = live
        self.speak = speak  # answer with an outgoing track for the spoken replies
        # The outgoing track, once an offer that can receive audio was answered.
        self.reply_track: ReplyTrack | None = None
        self.session_id = live.session_id
        self.sample_rate = sample_rate  # what the session declared in session.start
        self.channels = channels
        self.host_addresses = host_addresses
        self.pc: RTCPeerConnection | None = RTCPeerConnection(rtc_configuration(ice_servers))
        self.dropped_frames = 0
        self.frames_received = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(max_queued_frames)
        self._track: Any = None
        self._closed = False
        self._closer: asyncio.Future[None] | None = None
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connection_state(self) -> str:
        return "closed" if self.pc is None else str(self.pc.connectionState)

    @property
    def sending(self) -> bool:
        """Whether spoken replies go out on the reply track now (connected)."""
        track = self.reply_track
        return (
            not self._closed
            and track is not None
            and track.readyState == "live"
            and self.connection_state == "connected"
        )

    async def accept(self, offer_sdp: str) -> str:
        """Apply the client's offer; the answer SDP once ICE gathering completed.

        BadMessage ("invalid webrtc offer: ...") when the offer cannot be used.
        """
        pc = self.pc
        if pc is None:
            raise BadMessage("the webrtc connection is closed")
        if not offer_sdp.lstrip().startswith("v=0"):
            raise BadMessage(f"{INVALID_OFFER}: not an SDP offer")
        sdp = keep_candidates(offer_sdp, self.host_addresses)
        try:
            parsed = SessionDescription.parse(sdp)
        except Exception:
            raise BadMessage(INVALID_OFFER) from None
        audio = [m for m in parsed.media if m.kind == "audio"]
        if not audio:
            raise BadMessage(f"{INVALID_OFFER}: no audio")
        if not any(m.ice_candidates for m in parsed.media):
            raise BadMessage(
                f"{INVALID_OFFER}: no usable ICE candidates (trickle ICE is not supported: "
                "send the offer once ICE gathering is complete"
                + ("; this server only reaches loopback addresses" if self.host_addresses else "")
                + ")"
            )
        if not all(m.dtls is not None and m.dtls.fingerprints for m in audio):
            raise BadMessage(f"{INVALID_OFFER}: no DTLS fingerprint or setup")
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:
            raise self._refused(exc) from None
        audio_seen = False
        can_receive = audio[0].direction in (None, "sendrecv", "recvonly")
        for transceiver in pc.getTransceivers():
            if transceiver.kind == "audio" and not audio_seen:
                audio_seen = True
                if self.speak and can_receive:
                    # sendrecv (sendonly when the offer is recvonly): the replies
                    # go back on the same m-line the microphone comes in on.
                    self.reply_track = ReplyTrack(session_id=self.session_id)
                    transceiver.sender.replaceTrack(self.reply_track)
                    transceiver.direction = "sendrecv"
            else:
                transceiver.direction = "inactive"
        try:
            with host_candidates(self.host_addresses):
                answer = await pc.createAnswer()
                await pc.setLocalDescription(answer)  # gathers: no trickle ICE
        except Exception as exc:
            raise self._refused(exc) from None
        local = pc.localDescription
        if self._closed or local is None:
            raise BadMessage("the webrtc connection is closed")
        logger.info("webrtc answered", extra={"session_id": self.session_id})
        return str(local.sdp)

    def _refused(self, exc: Exception) -> BadMessage:
        """The BadMessage for an offer aiortc refused: its reason when it gives
        one (aiortc's ValueError and InvalidAccess/InvalidState/OperationError
        messages are short sentences about the SDP), else just "invalid"."""
        if self._closed:
            return BadMessage("the webrtc connection is closed")
        logger.info(
            "webrtc offer refused: %s",
            type(exc).__name__,
            extra={"session_id": self.session_id},
        )
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        if reason and isinstance(
            exc, ValueError | InvalidAccessError | InvalidStateError | OperationError
        ):
            return BadMessage(f"{INVALID_OFFER}: {reason}")
        return BadMessage(INVALID_OFFER)

    # -- events -------------------------------------------------------------

    def _on_track(self, track: Any) -> None:
        if self._closed or track.kind != "audio" or self._track is not None:
            return
        self._track = track
        self._spawn(self._read(track), "webrtc-read")
        self._spawn(self._feed(), "webrtc-feed")
        logger.info("webrtc audio track", extra={"session_id": self.session_id})

    async def _on_connection_state(self) -> None:
        state = self.connection_state
        logger.info(
            "webrtc connection %s", state, extra={"session_id": self.session_id, "state": state}
        )
        if state in ("failed", "closed") and not self._closed:
            # ICE or DTLS failed, or the client closed its side (aiortc then
            # closes the peer connection itself): release everything now; the
            # WebSocket stays open and may send a new offer.
            self._start_closing(drain=True)

    def _spawn(self, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=f"{name}-{self.session_id}")
        self.tasks.add(task)

    # -- audio ----------------------------------------------------------------

    async def _read(self, track: Any) -> None:
        """Frames off the track, converted, into the bounded queue."""
        layout = "mono" if self.channels == 1 else "stereo"
        resampler = av.AudioResampler(format="s16", layout=layout, rate=self.sample_rate)
        while True:
            try:
                frame = await track.recv()
            except MediaStreamError:
                break  # the track ended
            self.frames_received += 1
            frame.pts = None  # aiortc's pts may jump on loss; the resampler need not care
            pcm = b"".join(f.to_ndarray().tobytes() for f in resampler.resample(frame))
            if pcm:
                self._put(pcm)
        for f in resampler.resample(None):  # flush
            self._put(f.to_ndarray().tobytes())
        self._put(None)  # end of stream

    def _put(self, item: bytes | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()  # drop the oldest
            self.dropped_frames += 1
            if self.live.metrics is not None:
                self.live.metrics.dropped_frames.inc()
            if self.dropped_frames == 1 or self.dropped_frames % 100 == 0:
                logger.warning(
                    "webrtc audio dropped: the session is behind",
                    extra={"session_id": self.session_id, "dropped_frames": self.dropped_frames},
                )
        self._queue.put_nowait(item)

    async def _feed(self) -> None:
        live = self.live
        failures = 0
        while True:
            pcm = await self._queue.get()
            if pcm is None:
                # The client ended its track: close the open utterance now, as
                # audio.commit does. Not end_of_stream: the session goes on (a
                # new offer, binary frames or text turns may follow).
                with contextlib.suppress(Exception):
                    await live.commit()
                return
            try:
                await live.feed_audio(pcm)
            except Exception:
                failures += 1
                if failures == 1:  # once per peer connection, not once per frame
                    logger.exception(
                        "feeding webrtc audio failed", extra={"session_id": self.session_id}
                    )

    # -- teardown -------------------------------------------------------------

    async def close(self) -> None:
        """Stop the audio, close the peer connection, drop every reference.

        Idempotent; every caller returns once the teardown is complete (it runs
        to the end even if a caller is cancelled)."""
        await asyncio.shield(self._start_closing())

    def _start_closing(self, *, drain: bool = False) -> asyncio.Future[None]:
        if self._closer is None:
            self._closed = True
            self._closer = asyncio.ensure_future(self._close(drain))
        return self._closer

    async def _close(self, drain: bool) -> None:
        """`drain` (the client closed its side, or ICE/DTLS failed): close the
        peer connection first, which ends the track, and give the reader and
        feeder up to `DRAIN_SECONDS` to pass on the audio already received and
        the end of stream (closing the open utterance). Otherwise (the
        WebSocket ended, shutdown, a new offer) the tasks are cancelled first."""
        pc, self.pc = self.pc, None
        if pc is not None:
            pc.remove_all_listeners()
        if self.reply_track is not None:
            self.reply_track.stop()  # reply audio writes return at once from now on
        if drain and pc is not None:
            await self._close_pc(pc)
            pc = None
            pending = [t for t in self.tasks if not t.done()]
            if pending:
                await asyncio.wait(pending, timeout=DRAIN_SECONDS)
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        track, self._track = self._track, None
        if track is not None:
            track.remove_all_listeners()
            track.stop()
        if pc is not None:
            await self._close_pc(pc)
        while not self._queue.empty():
            self._queue.get_nowait()
        logger.info(
            "webrtc closed",
            extra={
                "session_id": self.session_id,
                "frames_received": self.frames_received,
                "dropped_frames": self.dropped_frames,
            },
        )

    @staticmethod
    async def _close_pc(pc: RTCPeerConnection) -> None:
        try:
            await pc.close()
        except Exception:
            logger.exception("closing the peer connection failed")
