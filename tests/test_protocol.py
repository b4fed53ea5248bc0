"""protocol.py: every event round-trips; malformed input raises the documented error."""

from __future__ import annotations

import json
from typing import Any

import pytest

from voice_agent.errors import BadAudio, BadMessage, Busy, EngineError, to_wire
from voice_agent.protocol import (
    CLIENT_EVENTS,
    SERVER_EVENTS,
    AudioCommit,
    CancelReply,
    ClientEvent,
    CommandEvent,
    ErrorEvent,
    Playback,
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
    SessionStart,
    SessionStarted,
    SessionUpdate,
    SpeechStartedEvent,
    SpeechStoppedEvent,
    TextTurn,
    UnknownEvent,
    WebRTCAnswer,
    WebRTCOffer,
    decode_client,
    decode_server,
    encode,
    error_event,
    reply_wire_id,
    utterance_wire_id,
)

CLIENT_SAMPLES: list[ClientEvent] = [
    SessionStart(),
    SessionStart(
        sample_rate=44100,
        channels=2,
        format="pcm16",
        session_id="abc",
        token="t0k",
        system_prompt="Be brief.",
        device="kitchen",
        speak=False,
        output_sample_rate=24000,
    ),
    TextTurn("turn on the kitchen light ✓"),
    AudioCommit(),
    CancelReply(),
    WebRTCOffer("v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\n"),
    Playback("r3", 1520),
    SessionUpdate(speak=False),
]

SERVER_SAMPLES: list[ServerEvent] = [
    SessionStarted("s1", "Qwen/Qwen2-Audio-7B-Instruct", True, 16000),
    SpeechStartedEvent("u1", 320),
    SpeechStoppedEvent("u1", 320, 2100),
    SpeechStoppedEvent("u2", 2500, 4100, "silence", 0.75),
    ReplyStarted("r1", "u1"),
    ReplyStarted("r2", None),
    ReplyDelta("r1", " Hello"),
    ReplyDone(
        "r1",
        "Hello there.",
        {"prompt_tokens": 80, "cached_tokens": 0, "completion_tokens": 3},
        {"queue_ms": 1.5, "ttft_ms": 120.0, "total_ms": 300.25},
    ),
    ReplyCancelled("r1", "barge_in", "Hello"),
    CommandEvent("turn_on", "kitchen_light"),
    CommandEvent("set_brightness", "kitchen_light", 40),
    WebRTCAnswer("v=0\r\n"),
    ErrorEvent("bad_message", "message is not valid JSON"),
    ErrorEvent("internal", "internal server error", "r4"),
    ReplyAudioStarted("r1", 24000),
    ReplyAudioDone("r1", 1830, False),
]


def test_every_wire_type_has_a_class() -> None:
    assert set(CLIENT_EVENTS) == {
        "session.start",
        "text",
        "audio.commit",
        "cancel",
        "webrtc.offer",
        "playback",
        "session.update",
    }
    assert set(SERVER_EVENTS) == {
        "session.started",
        "speech.started",
        "speech.stopped",
        "reply.started",
        "reply.delta",
        "reply.done",
        "reply.cancelled",
        "command",
        "webrtc.answer",
        "error",
        "reply.audio.started",
        "reply.audio.done",
    }
    assert {e.type for e in CLIENT_SAMPLES} == set(CLIENT_EVENTS)
    assert {e.type for e in SERVER_SAMPLES} == set(SERVER_EVENTS)


@pytest.mark.parametrize("event", CLIENT_SAMPLES, ids=lambda e: type(e).type)
def test_client_round_trip(event: ClientEvent) -> None:
    text = encode(event)
    assert json.loads(text)["type"] == event.type
    assert decode_client(text) == event
    assert decode_client(text.encode("utf-8")) == event


@pytest.mark.parametrize("event", SERVER_SAMPLES, ids=lambda e: type(e).type)
def test_server_round_trip(event: ServerEvent) -> None:
    text = encode(event)
    assert json.loads(text)["type"] == event.type
    assert decode_server(text) == event


def test_encode_is_compact_with_type_first_and_omits_unset_optionals() -> None:
    text = encode(SpeechStoppedEvent("u1", 320, 2100))
    assert text == '{"type":"speech.stopped","utterance_id":"u1","start_ms":320,"end_ms":2100}'
    assert encode(CommandEvent("turn_on", "lamp")) == (
        '{"type":"command","action":"turn_on","target":"lamp"}'
    )
    assert encode(ErrorEvent("busy", "x")) == '{"type":"error","code":"busy","message":"x"}'
    assert encode(AudioCommit()) == '{"type":"audio.commit"}'
    assert "session_id" not in json.loads(encode(SessionStart()))


def test_reply_started_keeps_null_utterance_id() -> None:
    assert json.loads(encode(ReplyStarted("r2", None))) == {
        "type": "reply.started",
        "reply_id": "r2",
        "utterance_id": None,
    }


def test_non_ascii_text_is_kept_as_is() -> None:
    assert "ü" in encode(ReplyDelta("r1", "Grüße"))


def test_session_start_defaults() -> None:
    e = decode_client('{"type": "session.start"}')
    assert e == SessionStart(16000, 1, "pcm16", None, None, None, None, None, 16000)


def test_unknown_extra_fields_are_ignored() -> None:
    e = decode_client('{"type":"text","text":"hi","future":{"a":[1,2]},"n":1}')
    assert e == TextTurn("hi")
    s = decode_server('{"type":"reply.delta","reply_id":"r1","text":"x","extra":true}')
    assert s == ReplyDelta("r1", "x")


def test_server_unknown_type_is_generic_and_round_trips() -> None:
    e = decode_server('{"type":"reply.reasoning","reply_id":"r1","n":2}')
    assert e == UnknownEvent("reply.reasoning", {"reply_id": "r1", "n": 2})
    assert decode_server(encode(e)) == e


def test_nullable_optional_fields_accept_null() -> None:
    e = decode_client('{"type":"session.start","session_id":null,"speak":null}')
    assert e == SessionStart()


def test_playback_float_ms_is_rounded() -> None:
    assert decode_client('{"type":"playback","reply_id":"r1","played_ms":12.6}') == Playback(
        "r1", 13
    )


Malformed = list[tuple[str, bytes | str, type[Exception], str]]

MALFORMED: Malformed = [
    ("not json", "hello", BadMessage, "JSON"),
    ("truncated json", '{"type": "text"', BadMessage, "JSON"),
    ("bad utf-8", b'{"type":"text","text":"\xff"}', BadMessage, "UTF-8"),
    ("array", '[{"type": "text"}]', BadMessage, "object"),
    ("string", '"text"', BadMessage, "object"),
    ("null", "null", BadMessage, "object"),
    ("missing type", '{"text": "hi"}', BadMessage, "'type'"),
    ("type not a string", '{"type": 3}', BadMessage, "'type'"),
    ("unknown type", '{"type": "reply.delta"}', BadMessage, "unknown"),
    ("missing field", '{"type": "text"}', BadMessage, "'text'"),
    ("text not a string", '{"type": "text", "text": 5}', BadMessage, "'text'"),
    ("text null", '{"type": "text", "text": null}', BadMessage, "'text'"),
    ("rate is a string", '{"type":"session.start","sample_rate":"16000"}', BadMessage, "rate"),
    ("rate is a bool", '{"type":"session.start","sample_rate":true}', BadMessage, "rate"),
    ("rate is a float", '{"type":"session.start","sample_rate":16000.0}', BadMessage, "rate"),
    ("channels is a bool", '{"type":"session.start","channels":true}', BadMessage, "channels"),
    ("speak is an int", '{"type":"session.start","speak":1}', BadMessage, "speak"),
    ("token is an int", '{"type":"session.start","token":1}', BadMessage, "token"),
    ("unknown format", '{"type":"session.start","format":"opus"}', BadMessage, "format"),
    ("format null", '{"type":"session.start","format":null}', BadMessage, "format"),
    ("sdp missing", '{"type":"webrtc.offer"}', BadMessage, "sdp"),
    ("speak missing", '{"type":"session.update"}', BadMessage, "speak"),
    ("speak a string", '{"type":"session.update","speak":"no"}', BadMessage, "speak"),
    ("played_ms bool", '{"type":"playback","reply_id":"r1","played_ms":false}', BadMessage, "ms"),
    ("played_ms NaN", '{"type":"playback","reply_id":"r1","played_ms":NaN}', BadMessage, "ms"),
    ("played_ms < 0", '{"type":"playback","reply_id":"r1","played_ms":-1}', BadMessage, "ms"),
    ("reply_id int", '{"type":"playback","reply_id":1,"played_ms":1}', BadMessage, "reply_id"),
    ("rate too low", '{"type":"session.start","sample_rate":7999}', BadAudio, "7999"),
    ("rate too high", '{"type":"session.start","sample_rate":96000}', BadAudio, "96000"),
    ("rate zero", '{"type":"session.start","sample_rate":0}', BadAudio, "rate"),
    ("channels 0", '{"type":"session.start","channels":0}', BadAudio, "channel"),
    ("channels 6", '{"type":"session.start","channels":6}', BadAudio, "channel"),
    ("out rate", '{"type":"session.start","output_sample_rate":4000}', BadAudio, "output"),
]


@pytest.mark.parametrize(
    ("data", "exc", "needle"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_malformed_client_messages(data: str | bytes, exc: type[Exception], needle: str) -> None:
    with pytest.raises(exc) as info:
        decode_client(data)
    wire = to_wire(info.value)
    assert wire.code == ("bad_message" if exc is BadMessage else "bad_audio")
    assert wire.close_code is None
    assert needle in wire.message
    assert type(info.value) is exc  # not a subclass standing in for it


def test_accepted_rate_and_channel_bounds() -> None:
    for rate in (8000, 22050, 44100, 48000):
        for channels in (1, 2):
            msg = {"type": "session.start", "sample_rate": rate, "channels": channels}
            e = decode_client(json.dumps(msg))
            assert isinstance(e, SessionStart)
            assert (e.sample_rate, e.channels) == (rate, channels)


def test_deeply_nested_json_is_bad_message() -> None:
    with pytest.raises(BadMessage):
        decode_client("[" * 100000 + "]" * 100000)


def test_decode_server_checks_known_fields() -> None:
    with pytest.raises(BadMessage, match="reply_id"):
        decode_server('{"type":"reply.delta","text":"x"}')
    with pytest.raises(BadMessage, match="demo_model"):
        decode_server(
            '{"type":"session.started","session_id":"s","model":"m",'
            '"demo_model":"yes","sample_rate":16000}'
        )
    with pytest.raises(BadMessage):
        decode_server("[]")


def test_decode_server_int_for_float_field() -> None:
    e = decode_server(
        '{"type":"speech.stopped","utterance_id":"u1","start_ms":0,"end_ms":10,"eot_probability":1}'
    )
    assert isinstance(e, SpeechStoppedEvent) and e.eot_probability == 1.0


def test_error_event_never_leaks_plain_exception_text() -> None:
    for exc in (RuntimeError("secret path /home/x"), KeyError("token=abc"), ValueError()):
        e = error_event(exc)
        assert e == ErrorEvent("internal", "internal server error")
        assert "secret" not in encode(e) and "abc" not in encode(e)


def test_error_event_uses_the_one_mapping() -> None:
    cases: list[tuple[Exception, str]] = [
        (BadMessage("message is not valid JSON"), "bad_message"),
        (BadAudio("odd byte count"), "bad_audio"),
        (Busy("the engine is busy"), "busy"),
        (EngineError("the model failed on this turn"), "internal"),
    ]
    for exc, code in cases:
        e = error_event(exc)
        assert (e.code, e.message) == (to_wire(exc).code, to_wire(exc).message)
        assert e.code == code
    assert error_event(Busy("x"), "r2").reply_id == "r2"


def test_wire_ids() -> None:
    assert utterance_wire_id(1) == "u1"
    assert reply_wire_id(12) == "r12"


def test_sample_events_encode_as_json_objects() -> None:
    for event in [*CLIENT_SAMPLES, *SERVER_SAMPLES]:
        obj: Any = json.loads(encode(event))
        assert isinstance(obj, dict) and next(iter(obj)) == "type"
