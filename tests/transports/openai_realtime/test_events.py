"""events.py: GA client events parsed strictly; the GA error object."""

from __future__ import annotations

import json
from typing import Any

import pytest

from voice_agent.errors import BadMessage, InvalidField, Unsupported
from voice_agent.transports.openai_realtime import events as ev


def parse(**obj: Any) -> ev.Request:
    return ev.parse(json.dumps(obj))


def test_known_events_become_typed_requests() -> None:
    assert parse(type="input_audio_buffer.append", audio="AAA=", event_id="e1") == ev.AudioAppend(
        "e1", "AAA="
    )
    assert isinstance(parse(type="input_audio_buffer.commit"), ev.AudioCommit)
    assert isinstance(parse(type="input_audio_buffer.clear"), ev.AudioClear)
    assert isinstance(parse(type="output_audio_buffer.clear"), ev.OutputAudioClear)
    assert parse(type="response.cancel") == ev.ResponseCancel(None, None)
    assert parse(type="conversation.item.retrieve", item_id="i") == ev.ItemRetrieve(None, "i")
    assert parse(type="conversation.item.delete", item_id="i") == ev.ItemDelete(None, "i")
    trunc = parse(type="conversation.item.truncate", item_id="i", content_index=0, audio_end_ms=5)
    assert trunc == ev.ItemTruncate(None, "i", 0, 5)


def test_a_user_item_with_text_and_audio() -> None:
    r = parse(
        type="conversation.item.create",
        previous_item_id=None,
        item={
            "id": "abc",
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "hi"},
                {"type": "input_audio", "audio": "AA=="},
            ],
        },
    )
    assert isinstance(r, ev.ItemCreate)
    assert r.item == ev.ItemIn("abc", "user", ("hi",), ("AA==",))


def test_response_create_options() -> None:
    r = parse(
        type="response.create",
        response={
            "output_modalities": ["text"],
            "max_output_tokens": 20,
            "metadata": {"client_event_id": "x"},
            "instructions": "say hi",
            "tools": [],
        },
    )
    assert isinstance(r, ev.ResponseCreate)
    assert r.output_modalities == ("text",)
    assert (r.max_output_tokens, r.max_tokens_set) == (20, True)
    assert r.metadata == {"client_event_id": "x"}
    assert r.instructions == "say hi"
    inf = parse(type="response.create", response={"max_output_tokens": "inf"})
    assert isinstance(inf, ev.ResponseCreate)
    assert (inf.max_output_tokens, inf.max_tokens_set) == (None, True)


@pytest.mark.parametrize(
    ("text", "exc"),
    [
        ("not json", BadMessage),
        ("[1]", BadMessage),
        ('{"no": "type"}', InvalidField),
        ('{"type": "made.up"}', InvalidField),
        ('{"type": "input_audio_buffer.append"}', InvalidField),
        ('{"type": "input_audio_buffer.append", "audio": "A", "extra": 1}', InvalidField),
        (
            '{"type": "conversation.item.truncate", "item_id": "i", "content_index": 0}',
            InvalidField,
        ),
        ('{"type": "response.create", "response": {"max_output_tokens": 0}}', InvalidField),
        ('{"type": "response.create", "response": {"output_modalities": ["video"]}}', InvalidField),
    ],
)
def test_malformed_events_are_refused(text: str, exc: type[Exception]) -> None:
    with pytest.raises(exc):
        ev.parse(text)


@pytest.mark.parametrize(
    ("obj", "param"),
    [
        (
            {"type": "response.create", "response": {"tools": [{"type": "function"}]}},
            "response.tools",
        ),
        (
            {"type": "conversation.item.create", "item": {"type": "function_call_output"}},
            "item.type",
        ),
        ({"type": "conversation.item.create", "item": {"type": "mcp_call"}}, "item.type"),
        (
            {
                "type": "conversation.item.create",
                "item": {"type": "message", "role": "user", "content": [{"type": "input_image"}]},
            },
            "item.content[0].type",
        ),
        ({"type": "response.create", "response": {"input": []}}, "response.input"),
        ({"type": "session.close"}, "type"),
    ],
)
def test_unsupported_features_are_refused_by_name(obj: dict[str, Any], param: str) -> None:
    with pytest.raises(Unsupported) as err:
        ev.parse(json.dumps(obj))
    assert err.value.param == param
    assert "not supported" in str(err.value)


def test_the_error_object() -> None:
    body = ev.error_body(Unsupported("tools are not supported", "session.tools"), "e7")
    assert body == {
        "type": "invalid_request_error",
        "code": "unsupported",
        "message": "tools are not supported",
        "param": "session.tools",
        "event_id": "e7",
    }
    internal = ev.error_body(RuntimeError("secret detail"), None)
    assert internal["type"] == "server_error"
    assert internal["code"] == "internal"
    assert "secret" not in internal["message"]
    assert ev.event_id_of('{"type": "x", "event_id": "e9"}') == "e9"
    assert ev.event_id_of("not json") is None
