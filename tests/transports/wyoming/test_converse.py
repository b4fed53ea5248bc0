"""converse's pure parts: conversation ids, the requesting device, the spoken text."""

from __future__ import annotations

import pytest

from voice_agent.errors import BadMessage
from voice_agent.transports.wyoming.converse import (
    DEFAULT_DEVICE,
    conversation_id,
    device_of,
    spoken_text,
)


def test_conversation_id_from_the_context_or_a_new_one() -> None:
    assert conversation_id({"conversation_id": "01HS6SP2XD1E5HEHVDZE8R2WMR"}) == (
        "01HS6SP2XD1E5HEHVDZE8R2WMR"
    )
    fresh = {conversation_id(None), conversation_id({}), conversation_id({"conversation_id": ""})}
    assert len(fresh) == 3 and all(len(c) == 32 for c in fresh)


@pytest.mark.parametrize("bad", ["a b", "x" * 129, 5, ["a"], "../etc", "é"])
def test_bad_conversation_ids_are_bad_messages(bad: object) -> None:
    with pytest.raises(BadMessage):
        conversation_id({"conversation_id": bad})


def test_device_is_a_valid_device_id_or_the_default() -> None:
    assert device_of({"device_id": "4f3a9b2c1d"}) == "4f3a9b2c1d"
    assert device_of({"device_id": "assist_satellite.kitchen"}) == DEFAULT_DEVICE  # a dot
    assert device_of({"satellite_id": "x"}) == DEFAULT_DEVICE
    assert device_of(None) == DEFAULT_DEVICE
    assert device_of({"device_id": "x" * 65}) == DEFAULT_DEVICE


def test_spoken_text_has_no_command_tags() -> None:
    reply = 'Done.\n<command>{"action": "on", "target": "light.kitchen"}</command>\nAnything else?'
    assert spoken_text(reply) == "Done. Anything else?"
    assert spoken_text('Sure. <command>{"action": ') == "Sure."  # cut off mid-tag
    assert spoken_text("Plain  text\n") == "Plain text"
