"""WebRTC ICE configuration: --ice-server URLs and the host candidates a
loopback-bound server gathers and keeps."""

from __future__ import annotations

import aioice.ice
import pytest
from aiortc import RTCPeerConnection
from aiortc.mediastreams import AudioStreamTrack
from aiortc.rtcicetransport import connection_kwargs

from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import ConfigError
from voice_agent.transports import webrtc
from voice_agent.transports.webrtc import (
    IceServer,
    host_addresses_for_bind,
    host_candidates,
    keep_candidates,
    loopback_candidates,
    parse_ice_server,
    parse_ice_servers,
    rtc_configuration,
)
from voice_agent.transports.websocket import WebSocketServerApp

from . import webrtc_support
from .webrtc_support import (
    candidate_addresses,
    make_offer,
    reply,
)

pytestmark = pytest.mark.timeout(120)

# the fixtures of webrtc_support that the tests below use
peers = webrtc_support.peers


# ------------------------------------------------------------ ICE servers


def test_parse_ice_server_accepts_stun_and_turn() -> None:
    assert parse_ice_server("stun:stun.example.org:3478") == IceServer("stun:stun.example.org:3478")
    assert parse_ice_server(" STUN:192.168.1.2 ") == IceServer("stun:192.168.1.2")
    assert parse_ice_server("turn:alice:s%40cr%3At@turn.example.org:3478") == IceServer(
        "turn:turn.example.org:3478", "alice", "s@cr:t"
    )
    assert parse_ice_server("turn:u:p@10.0.0.1:3478?transport=tcp") == IceServer(
        "turn:10.0.0.1:3478?transport=tcp", "u", "p"
    )
    assert parse_ice_server("turns:u:p@turn.example.org:5349?transport=tcp") == IceServer(
        "turns:turn.example.org:5349?transport=tcp", "u", "p"
    )


@pytest.mark.parametrize(
    "url",
    [
        "",
        "stun",
        "stun:",
        "http://stun.example.org",
        "example.org:3478",
        "stuns:stun.example.org:5349",  # aiortc would skip it silently
        "stun:u:p@stun.example.org:3478",  # credentials on STUN
        "turn:turn.example.org:3478",  # TURN without credentials
        "turn:alice@turn.example.org:3478",  # no password
        "turn::secret@turn.example.org:3478",  # no user
        "stun:stun.example.org:0",
        "stun:stun.example.org:99999",
        "stun:stun.example.org:port",
        "stun:[::1]:3478",  # aiortc cannot parse IPv6 literals
        "stun:stun.example.org?transport=udp",
        "turn:u:p@turn.example.org:3478?transport=tls",
        "turns:u:p@turn.example.org:5349?transport=udp",
    ],
)
def test_parse_ice_server_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ConfigError, match="--ice-server"):
        parse_ice_server(url)


def test_ice_server_errors_never_repeat_the_password() -> None:
    for url in ("turn:u:hunter2@turn.example.org:3478?transport=tls", "turn:u:hunter2@:3478"):
        with pytest.raises(ConfigError) as info:
            parse_ice_server(url)
        assert "hunter2" not in str(info.value)


def test_parse_ice_servers_one_stun_and_one_turn_at_most() -> None:
    assert parse_ice_servers(()) == ()
    both = parse_ice_servers(["stun:a.example.org", "turn:u:p@b.example.org"])
    assert [s.url for s in both] == ["stun:a.example.org", "turn:b.example.org"]
    with pytest.raises(ConfigError, match="at most one STUN"):
        parse_ice_servers(["stun:a.example.org", "stun:b.example.org"])
    with pytest.raises(ConfigError, match="at most one STUN"):
        parse_ice_servers(["turn:u:p@a.example.org", "turn:u:p@b.example.org"])


def test_no_ice_servers_by_default() -> None:
    """An explicit empty list: aiortc would use a public STUN server for None."""
    assert Config().ice_servers == ()
    configuration = rtc_configuration(Config().ice_servers)
    assert configuration.iceServers == []
    assert connection_kwargs(configuration.iceServers) == {}  # aioice gets no server


def test_configured_ice_servers_reach_aioice() -> None:
    configuration = rtc_configuration(
        ["stun:stun.example.org:3479", "turn:al%20ice:pw@turn.example.org?transport=tcp"]
    )
    kwargs = connection_kwargs(configuration.iceServers)
    assert kwargs["stun_server"] == ("stun.example.org", 3479)
    assert kwargs["turn_server"] == ("turn.example.org", 3478)
    assert kwargs["turn_transport"] == "tcp"
    assert (kwargs["turn_username"], kwargs["turn_password"]) == ("al ice", "pw")


async def test_server_refuses_to_start_with_a_bad_ice_server() -> None:
    engine = ScriptedEngine(reply)
    app = WebSocketServerApp(Config(host="127.0.0.1", port=0, ice_servers=("stuns:x",)), engine)
    with pytest.raises(ConfigError, match="--ice-server"):
        await app.start()
    assert not engine.started


# ------------------------------------------------------------ ICE candidates


def test_host_addresses_for_bind() -> None:
    assert host_addresses_for_bind("127.0.0.1") == ("127.0.0.1",)
    assert host_addresses_for_bind("127.0.0.2") == ("127.0.0.2",)
    assert host_addresses_for_bind("localhost") == ("127.0.0.1",)
    assert host_addresses_for_bind("::1") == ("::1",)
    for host in ("0.0.0.0", "::", "", "192.168.1.10", "example.org"):
        assert host_addresses_for_bind(host) is None, host


SDP_WITH_CANDIDATES = "\r\n".join(
    [
        "v=0",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host",
        "a=candidate:2 1 udp 2130706431 ::1 50001 typ host",
        "a=candidate:3 1 udp 2130706431 192.168.1.20 50002 typ host",
        "a=candidate:4 1 udp 2130706431 8d2f0a33-aaaa.local 50003 typ host",
        "a=candidate:5 1 udp 1694498815 203.0.113.7 50004 typ srflx raddr 0.0.0.0 rport 0",
        "a=candidate:6 broken",
        "a=end-of-candidates",
        "",
    ]
)


def test_keep_candidates_keeps_only_loopback_for_a_loopback_server() -> None:
    kept = keep_candidates(SDP_WITH_CANDIDATES, ("127.0.0.1",))
    assert candidate_addresses(kept) == ["127.0.0.1", "::1"]
    others = [line for line in SDP_WITH_CANDIDATES.splitlines() if "candidate:" not in line]
    assert [line for line in kept.splitlines() if "candidate:" not in line] == others
    assert kept.endswith("\r\n") and "a=end-of-candidates" in kept
    assert keep_candidates(SDP_WITH_CANDIDATES, None) == SDP_WITH_CANDIDATES


def test_host_candidates_choose_aioice_host_addresses() -> None:
    default = aioice.ice.get_host_addresses(True, True)
    assert "127.0.0.1" not in default and "::1" not in default  # aioice skips loopback
    with host_candidates(["127.0.0.1", "::1"]):
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(False, True) == ["::1"]
        with loopback_candidates():
            assert aioice.ice.get_host_addresses(True, True) == ["127.0.0.1"]
    assert aioice.ice.get_host_addresses(True, True) == default
    hook = aioice.ice.get_host_addresses
    webrtc.install_host_address_hook()
    assert aioice.ice.get_host_addresses is hook  # installed once


async def test_a_loopback_client_offer_has_only_loopback_candidates(
    peers: list[RTCPeerConnection],
) -> None:
    pc = await make_offer(AudioStreamTrack())
    peers.append(pc)
    assert pc.localDescription is not None
    assert candidate_addresses(pc.localDescription.sdp) == ["127.0.0.1"]
