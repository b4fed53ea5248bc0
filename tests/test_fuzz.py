"""Fuzzing: property tests of the codec and the Segmenter, and a socket-level
fuzzer against a live server. Only documented errors may escape."""

from __future__ import annotations

import asyncio
import json
import random
import sys
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from voice_agent.client import RealtimeClient
from voice_agent.config import Config
from voice_agent.engine.scripted import ScriptedEngine
from voice_agent.errors import BadAudio, BadMessage
from voice_agent.protocol import (
    CLIENT_EVENTS,
    ReplyDone,
    SessionStart,
    UnknownEvent,
    decode_client,
    decode_server,
    encode,
)
from voice_agent.transports.websocket import running_server
from voice_agent.vad import Segmenter

DOCUMENTED_CODES = {"bad_message", "not_started", "bad_audio", "busy", "internal"}
DOCUMENTED_CLOSES = {1000, 1001, 1008, 1009, 1011, 1013}

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
json_values = st.recursive(
    _scalars | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["type", "text", "sample_rate", "channels", "format", "session_id", "token", "device",
     "system_prompt", "sdp", "reply_id", "played_ms", "speak", "x"]
)  # fmt: skip
messages = st.builds(
    lambda extra, kind: {**extra, "type": kind},
    st.dictionaries(field_names, json_values, max_size=5),
    st.sampled_from(sorted(CLIENT_EVENTS)) | st.text(max_size=12) | json_values,
)


def _decode_or_documented(data: str | bytes) -> None:
    try:
        event = decode_client(data)
    except (BadMessage, BadAudio) as exc:
        assert str(exc)  # a message for the client
        return
    assert event.type in CLIENT_EVENTS
    # what decodes also encodes, and decodes to the same event
    assert decode_client(encode(event)) == event


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_codec_on_arbitrary_bytes_and_text(data: str | bytes) -> None:
    _decode_or_documented(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages)
def test_codec_on_json_objects_of_known_shapes(obj: dict[str, Any]) -> None:
    _decode_or_documented(json.dumps(obj))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(8000, 48000),
    st.sampled_from([1, 2]),
    st.booleans(),
    st.sampled_from([5, 10, 30, 60]),
    st.sampled_from([16000, 44100]),
)
def test_session_start_within_limits_decodes(
    rate: int, channels: int, extra: bool, played: int, other: int
) -> None:
    obj: dict[str, Any] = {"type": "session.start", "sample_rate": rate, "channels": channels}
    if extra:
        obj["unknown_field"] = [played, other]  # unknown fields are ignored
    event = decode_client(json.dumps(obj))
    assert isinstance(event, SessionStart) and (event.sample_rate, event.channels) == (
        rate,
        channels,
    )


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rate=st.integers(6000, 50000),
    channels=st.integers(0, 3),
    chunks=st.lists(st.binary(max_size=3000), max_size=25),
    loud=st.booleans(),
)
def test_segmenter_on_garbage(rate: int, channels: int, chunks: list[bytes], loud: bool) -> None:
    try:
        seg = Segmenter(sample_rate=rate, channels=channels)
    except BadAudio:
        assert not (8000 <= rate <= 48000 and channels in (1, 2))
        return
    fed = 0
    for chunk in chunks:
        if loud:  # random bytes are loud noise; repeat them to make long bursts
            chunk = chunk * 8
        try:
            events = seg.feed(chunk)
        except BadAudio:
            assert len(chunk) % (2 * channels)
            continue
        fed += len(chunk) // (2 * channels)
        assert isinstance(events, list)
        assert seg.position_ms == fed * 1000 // rate  # times come from sample counts
    assert isinstance(seg.flush(), list)


# -- socket level ---------------------------------------------------------------


def _random_message(rng: random.Random, max_bytes: int) -> str | bytes:
    roll = rng.random()
    if roll < 0.30:  # audio: whole samples, odd lengths, empty
        n = rng.choice([0, 1, 3, 320, 640, 641, 1920, rng.randrange(0, 8000)])
        return rng.randbytes(n)
    if roll < 0.32:  # over the frame limit: close 1009
        return bytes(max_bytes + 1 + rng.randrange(100))
    if roll < 0.40:  # not JSON / not an object / broken UTF-8
        return (
            rng.choice(["", "{", "[1,2]", "null", '"x"', "\x00", '{"type": }'])
            if (rng.random() < 0.7)
            else rng.randbytes(rng.randrange(1, 50)).decode("latin-1")
        )
    kind = rng.choice([*sorted(CLIENT_EVENTS), "session.start", "text", "nope", ""])
    obj: dict[str, Any] = {"type": kind}
    pool: list[Any] = [
        None,
        True,
        -1,
        0,
        1,
        2,
        16000,
        48000,
        96000,
        1.5,
        "",
        "x",
        "pcm16",
        "a" * 5000,
        [],
        {},
        {"a": 1},
        "Grüße ☃",
        2**70,
    ]
    for name in rng.sample(
        [
            "sample_rate",
            "channels",
            "format",
            "session_id",
            "text",
            "device",
            "token",
            "system_prompt",
            "sdp",
            "reply_id",
            "played_ms",
            "speak",
            "extra",
        ],
        rng.randrange(0, 5),
    ):
        obj[name] = rng.choice(pool)
    if rng.random() < 0.05:
        obj["type"] = rng.choice(pool)
    return json.dumps(obj)


async def _fuzz_case(url: str, rng: random.Random, max_bytes: int, outcomes: Counter[str]) -> None:
    sequence = [_random_message(rng, max_bytes) for _ in range(rng.randrange(1, 9))]
    if rng.random() < 0.5:  # half the cases start a session first
        sequence.insert(0, json.dumps({"type": "session.start"}))
    async with ws_connect(url, max_size=2**24) as ws:
        try:
            for message in sequence:
                await ws.send(message)
            await ws.send(json.dumps({"type": "fuzz.probe"}))
            async with asyncio.timeout(30):
                while True:
                    raw = await ws.recv()
                    if isinstance(raw, bytes):
                        continue
                    event = decode_server(raw)
                    assert not isinstance(event, UnknownEvent), raw
                    if event.type == "error":
                        code = event.code  # type: ignore[attr-defined]
                        assert code in DOCUMENTED_CODES and code != "internal", raw
                        if "fuzz.probe" in event.message:  # type: ignore[attr-defined]
                            outcomes["answered"] += 1
                            return
                        outcomes[f"error {code}"] += 1
        except ConnectionClosed:
            pass
        assert ws.close_code in DOCUMENTED_CLOSES, ws.close_code
        outcomes[f"closed {ws.close_code}"] += 1


@pytest.mark.timeout(180)
async def test_socket_fuzzer_1000_cases() -> None:
    cases, workers, seed = 1000, 4, 20261126
    config = Config(port=0, max_message_bytes=16384, max_queue=256)
    engine = ScriptedEngine(lambda t: "ok fine", token_delay=0.0005)
    outcomes: Counter[str] = Counter()
    async with running_server(config, engine) as app:

        async def worker(w: int) -> None:
            rng = random.Random(seed + w)
            for _ in range(cases // workers):
                await _fuzz_case(app.url, rng, config.max_message_bytes, outcomes)

        await asyncio.gather(*(worker(w) for w in range(workers)))
        # the server survived: still healthy, and a normal client is served
        async with RealtimeClient(app.url) as client:
            await client.start()
            await client.send_text("after the fuzz")
            assert (await client.wait_for(ReplyDone, 20)).text == "ok fine"
        async with asyncio.timeout(20):
            while len(app.sessions) > 0:
                await asyncio.sleep(0.05)
    assert outcomes["answered"] + sum(v for k, v in outcomes.items() if k.startswith("closed")) == (
        cases
    )
    assert outcomes["closed 1009"] > 0 and outcomes["answered"] > 0
    print(json.dumps({"fuzz_cases": cases, "outcomes": dict(outcomes)}), file=sys.stderr)
