"""A session's WebRTC peer connection, as the WebSocket connection sees it.

`webrtc.offer` on a started session gets a peer connection (transports/
webrtc.py) whose audio track feeds the session instead of binary frames
(both keep working); a second offer replaces the first. Without aiortc the
offer is refused (bad_message). On a peer connection that is connected when
a reply's audio starts, that audio goes on its reply track
(transports/reply_track.py, paced in real time, what it buffers dropped at
once by a cancel or `reply.cancelled`) instead of binary frames; the events
stay on the socket.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

from voice_agent.config import Config
from voice_agent.errors import BadMessage
from voice_agent.live import LiveSession
from voice_agent.protocol import ReplyAudioDone, ReplyAudioStarted, ReplyCancelled, ServerEvent

if TYPE_CHECKING:
    from voice_agent.transports.reply_track import ReplyTrack
    from voice_agent.transports.webrtc import WebRTCInput


class PeerLink:
    """The peer connection of one WebSocket session (at most one at a time),
    registered in `peers` (the server's, by session id) while it is open."""

    def __init__(self, webrtc: ModuleType | None, peers: dict[str, WebRTCInput]) -> None:
        self.webrtc = webrtc
        self.peers = peers
        self.peer: WebRTCInput | None = None
        # The reply whose audio goes out on the track, and that track
        # (chosen at reply.audio.started; None: binary frames).
        self._route: tuple[str, ReplyTrack] | None = None

    async def offer(
        self,
        live: LiveSession,
        sdp: str,
        config: Config,
        audio_format: tuple[int, int],
        *,
        speak: bool,
    ) -> str:
        """The answer SDP; a previous peer connection is closed first."""
        webrtc = self.webrtc
        if webrtc is None:
            raise BadMessage("webrtc is not enabled on this server")
        await self.close()
        rate, channels = audio_format
        peer: WebRTCInput = webrtc.WebRTCInput(
            live,
            sample_rate=rate,
            channels=channels,
            ice_servers=config.ice_servers,
            host_addresses=webrtc.host_addresses_for_bind(config.host),
            speak=speak,  # an outgoing track for the spoken replies
        )
        self.peer = peer
        self.peers[live.session_id] = peer
        try:
            answer: str = await peer.accept(sdp)
        except BaseException:
            await self.close()
            raise
        return answer

    async def close(self) -> None:
        peer, self.peer = self.peer, None
        if peer is None:
            return
        if self.peers.get(peer.session_id) is peer:
            del self.peers[peer.session_id]
        await peer.close()

    def route(self, event: ServerEvent) -> None:
        """A reply's audio goes on the track when it is connected as the
        reply's audio starts; a cancel drops what it holds."""
        if isinstance(event, ReplyAudioStarted):
            peer = self.peer
            track = peer.reply_track if peer is not None and peer.sending else None
            self._route = (event.reply_id, track) if track is not None else None
        elif isinstance(event, ReplyAudioDone):
            route = self._route
            if route is not None and route[0] == event.reply_id:
                self._route = None
                if event.cancelled:
                    route[1].clear()
                else:
                    route[1].flush()
        elif isinstance(event, ReplyCancelled):
            self.clear()

    def clear(self) -> None:
        """Drop the reply audio buffered in the track (a cancel, a barge-in)."""
        self._route = None
        peer = self.peer
        if peer is not None and peer.reply_track is not None:
            peer.reply_track.clear()

    @property
    def track(self) -> ReplyTrack | None:
        """The track the current reply's audio goes to (None: binary frames)."""
        route = self._route
        return route[1] if route is not None else None
