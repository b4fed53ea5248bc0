"""The translator, event by event: native replies -> GA responses (no network)."""

from __future__ import annotations

import base64
from typing import Any

from tests.transports.openai_realtime.support import b64, events, send, translator, types
from voice_agent.engine.types import TruncateReply
from voice_agent.protocol import (
    ErrorEvent,
    ReplyAudioDone,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    SpeechStartedEvent,
    SpeechStoppedEvent,
)
from voice_agent.transports.openai_realtime.calls import Cancel, Edit, Failed, StopAudio
from voice_agent.transports.openai_realtime.translator import Translator

USAGE = {"prompt_tokens": 30, "cached_tokens": 12, "completion_tokens": 2}
TIMING = {"queue_ms": 1.0, "ttft_ms": 2.0, "total_ms": 3.0}
OPENING = [
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
]


def text_mode(t: Translator) -> None:
    send(t, "session.update", session={"output_modalities": ["text"]})


def reply(t: Translator, text: str = "hi there") -> list[dict[str, Any]]:
    out = t.server(ReplyStarted("r1", "u1"))
    for word in text.split(" "):
        out += t.server(ReplyDelta("r1", word))
    return out + t.server(ReplyDone("r1", text, USAGE, TIMING))


def test_a_text_reply_is_a_whole_response() -> None:
    t = translator()
    text_mode(t)
    t.server(SpeechStartedEvent("u1", 0))
    user = t.server(SpeechStoppedEvent("u1", 0, 800))[2]["item"]["id"]
    out = reply(t)
    assert types(out) == [
        *OPENING,
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "conversation.item.done",
        "response.done",
        "rate_limits.updated",
    ]
    created, added_item = out[0]["response"], out[2]
    assert created["status"] == "in_progress" and created["output"] == []
    assert added_item["previous_item_id"] == user
    ids = {(e["response_id"], e["item_id"]) for e in out if "item_id" in e and "response_id" in e}
    assert len(ids) == 1  # one response, one item throughout
    assert [e["delta"] for e in out if e["type"].endswith(".delta")] == ["hi", "there"]
    assert out[6]["text"] == "hi there"
    done = out[-2]["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"] == [{"type": "output_text", "text": "hi there"}]
    assert done["usage"]["input_tokens"] == 30
    assert done["usage"]["output_tokens"] == 2
    assert done["usage"]["input_token_details"]["cached_tokens"] == 12


def test_an_audio_reply_waits_for_its_audio_before_response_done() -> None:
    t = translator()
    out = t.server(ReplyStarted("r1", "u1"))
    assert out[3]["part"] == {"type": "audio", "transcript": ""}
    delta = t.server(ReplyDelta("r1", "hello"))
    assert types(delta) == ["response.output_audio_transcript.delta"]
    audio = t.audio(b"\x01\x00\x02\x00", "r1")
    assert types(audio) == ["response.output_audio.delta"]
    assert base64.b64decode(audio[0]["delta"]) == b"\x01\x00\x02\x00"
    assert t.server(ReplyDone("r1", "hello", USAGE, TIMING)) == []  # audio still goes out
    assert types(t.audio(b"\x00\x00", "r1")) == ["response.output_audio.delta"]
    end = t.server(ReplyAudioDone("r1", 500, False))
    assert types(end)[:3] == [
        "response.output_audio.done",
        "response.output_audio_transcript.done",
        "response.content_part.done",
    ]
    assert end[1]["transcript"] == "hello"
    done = next(e for e in end if e["type"] == "response.done")["response"]
    assert done["status"] == "completed"
    assert done["output"][0]["content"][0] == {"type": "output_audio", "transcript": "hello"}
    assert t.audio(b"\x00\x00", "r1") == []  # nothing after response.done


def test_a_reply_without_audio_settles() -> None:
    t = translator()
    t.server(ReplyStarted("r1", "u1"))
    assert t.server(ReplyDone("r1", "", USAGE, TIMING)) == []
    assert "response.done" in types(t.settled("r1"))


def test_a_server_that_does_not_speak_sends_the_transcript_only() -> None:
    t = translator(can_speak=False)
    out = t.server(ReplyStarted("r1", "u1")) + t.server(ReplyDelta("r1", "x"))
    out += t.server(ReplyDone("r1", "x", USAGE, TIMING))
    assert "response.output_audio.done" not in types(out)
    assert "response.output_audio_transcript.done" in types(out)
    assert "response.done" in types(out)


def test_barge_in_cancels_with_turn_detected() -> None:
    t = translator()
    text_mode(t)
    t.server(ReplyStarted("r1", "u1"))
    t.server(ReplyDelta("r1", "long"))
    out = t.server(ReplyCancelled("r1", "barge_in", "long"))
    done = out[-2]["response"]
    assert done["status"] == "cancelled"
    assert done["status_details"] == {"type": "cancelled", "reason": "turn_detected"}
    assert done["output"][0]["status"] == "incomplete"
    assert out[-3]["item"]["status"] == "incomplete"


def test_response_cancel_while_generating_and_while_speaking() -> None:
    t = translator()
    assert send(t, "response.cancel")[0].exc.code == "response_cancel_not_active"  # type: ignore[union-attr]
    t.server(ReplyStarted("r1", "u1"))
    assert types(send(t, "response.cancel")) == ["StopAudio", "Cancel"]
    out = t.server(ReplyCancelled("r1", "client", ""))
    assert out[-2]["response"]["status_details"]["reason"] == "client_cancelled"
    # a reply whose text is done and whose audio still plays ends at once
    t.server(ReplyStarted("r2", None))
    t.server(ReplyDone("r2", "x", USAGE, TIMING))
    outs = send(t, "response.cancel")
    assert isinstance(outs[0], StopAudio) and not any(isinstance(o, Cancel) for o in outs)
    done = [o for o in outs if isinstance(o, dict) and o["type"] == "response.done"]
    assert done[0]["response"]["status"] == "cancelled"


def test_a_failed_reply_is_a_failed_response_and_other_errors_are_error_events() -> None:
    t = translator()
    text_mode(t)
    t.server(ReplyStarted("r1", None))
    out = t.server(ErrorEvent("internal", "internal server error", "r1"))
    done = out[-2]["response"]
    assert done["status"] == "failed"
    assert done["status_details"]["error"]["code"] == "internal"
    [error] = t.server(ErrorEvent("busy", "utterance u3 dropped: too many turns waiting"))
    assert error["type"] == "error"
    assert error["error"]["type"] == "server_error" and error["error"]["code"] == "busy"


def test_response_create_options_and_metadata_reach_the_response() -> None:
    t = translator()
    text_mode(t)
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    send(t, "conversation.item.create", item=item)
    meta = {"client_event_id": "response_create_1"}
    outs = send(
        t,
        "response.create",
        response={"metadata": meta, "max_output_tokens": 7, "output_modalities": ["text"]},
    )
    respond = outs[-1]
    assert respond.max_output_tokens == 7 and respond.audio is False  # type: ignore[union-attr]
    created = t.server(ReplyStarted("r1", None))[0]["response"]
    assert created["metadata"] == meta
    assert created["max_output_tokens"] == 7
    busy = send(t, "conversation.item.create", item=item) + send(t, "response.create")
    assert isinstance(busy[-1], Failed)
    assert busy[-1].exc.code == "conversation_already_has_active_response"
    done = t.server(ReplyDone("r1", "y", USAGE, TIMING))
    assert next(e for e in done if e["type"] == "response.done")["response"]["metadata"] == meta


def test_a_new_reply_completes_the_one_still_speaking() -> None:
    t = translator()
    t.server(ReplyStarted("r1", "u1"))
    t.server(ReplyDone("r1", "a", USAGE, TIMING))
    out = t.server(ReplyStarted("r2", "u2"))
    assert types(out)[-5:] == ["rate_limits.updated", *OPENING]
    first_done = next(e for e in out if e["type"] == "response.done")["response"]
    assert first_done["status"] == "completed"  # its text was all generated


def test_truncate_cuts_the_transcript_to_what_was_heard() -> None:
    t = translator()
    item_id = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    t.server(ReplyDelta("r1", "one two three four"))
    t.audio(bytes(2 * 24000), "r1")  # one second of audio went out
    t.server(ReplyDone("r1", "one two three four", USAGE, TIMING))
    outs = send(t, "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=500)
    assert isinstance(outs[0], StopAudio)  # its audio stops; the response ends cancelled
    done = next(o for o in outs if isinstance(o, dict) and o["type"] == "response.done")
    assert done["response"]["status"] == "cancelled"
    truncated = next(o for o in outs if isinstance(o, dict) and o["type"].endswith("truncated"))
    assert truncated == {
        "type": "conversation.item.truncated",
        "event_id": truncated["event_id"],
        "item_id": item_id,
        "content_index": 0,
        "audio_end_ms": 500,
    }
    item = send(t, "conversation.item.retrieve", item_id=item_id)[0]["item"]
    assert item["content"][0]["transcript"] == "one two"


def test_truncate_of_a_reply_still_generating_cancels_it() -> None:
    t = translator()
    item_id = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    t.server(ReplyDelta("r1", "alpha beta"))
    t.audio(bytes(2 * 2400), "r1")  # 100 ms
    outs = send(t, "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=50)
    # the model's history: its one delta was not heard whole (history tests: test_history.py)
    assert outs == [StopAudio(), Cancel(), Edit(TruncateReply(0)), events(outs)[0]]
    assert types(outs)[-1] == "conversation.item.truncated"
    t.server(ReplyDelta("r1", " gamma"))
    end = t.server(ReplyCancelled("r1", "client", "alpha beta gamma"))
    done = next(e for e in events(end) if e["type"] == "response.done")["response"]
    assert done["output"][0]["content"][0]["transcript"] == "alpha"


def test_truncate_refuses_what_it_cannot_cut() -> None:
    t = translator()
    item_id = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    t.audio(bytes(2 * 2400), "r1")  # 100 ms
    [past] = send(
        t, "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=900
    )
    assert isinstance(past, Failed) and past.exc.param == "audio_end_ms"  # type: ignore[attr-defined]
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    user_id = events(send(t, "conversation.item.create", item=item))[0]["item"]["id"]
    for item_id in (user_id, "unknown"):
        [failed] = send(
            t, "conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=1
        )
        assert isinstance(failed, Failed) and failed.exc.code == "bad_message"


def test_idle_timeout_triggers_a_response_after_the_last_one() -> None:
    t = translator()
    td = {"type": "server_vad", "idle_timeout_ms": 5000}
    send(
        t,
        "session.update",
        session={"output_modalities": ["text"], "audio": {"input": {"turn_detection": td}}},
    )
    second = b64(bytes(2 * 24000))
    send(t, "input_audio_buffer.append", audio=second)  # (the session starts)
    t.server(ReplyStarted("r1", "u1"))
    t.server(ReplyDone("r1", "hi", USAGE, TIMING))  # response.done at 1000 ms: the timer starts
    for _ in range(4):
        assert types(send(t, "input_audio_buffer.append", audio=second)) == ["Feed"]
    outs = send(t, "input_audio_buffer.append", audio=second)
    assert types(outs) == [
        "Feed",
        "input_audio_buffer.timeout_triggered",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        "Respond",
    ]
    assert (outs[1]["audio_start_ms"], outs[1]["audio_end_ms"]) == (1000, 6000)
    assert types(send(t, "input_audio_buffer.append", audio=second)) == ["Feed"]  # once


def test_a_reply_cut_at_max_output_tokens_is_incomplete() -> None:
    t = translator()
    text_mode(t)
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    send(t, "conversation.item.create", item=item)
    send(t, "response.create", response={"max_output_tokens": 2})
    t.server(ReplyStarted("r1", None))
    out = t.server(ReplyDone("r1", "a b", USAGE, TIMING))  # 2 completion tokens
    done = next(e for e in out if e["type"] == "response.done")["response"]
    assert done["status"] == "incomplete"
    assert done["status_details"] == {"type": "incomplete", "reason": "max_output_tokens"}


def test_the_last_assistant_item_may_be_deleted_older_ones_not() -> None:
    t = translator()
    text_mode(t)
    first = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    t.server(ReplyDone("r1", "a", USAGE, TIMING))
    second = t.server(ReplyStarted("r2", "u2"))[1]["item"]["id"]
    t.server(ReplyCancelled("r2", "barge_in", "b"))  # LiveKit then deletes the reply
    [deleted] = send(t, "conversation.item.delete", item_id=second)
    assert deleted == {
        "type": "conversation.item.deleted",
        "event_id": deleted["event_id"],
        "item_id": second,
    }
    assert isinstance(send(t, "conversation.item.retrieve", item_id=second)[0], Failed)
    # now `first` is the last item, but an older reply: only the last may go
    t.server(ReplyStarted("r3", "u3"))
    [refused] = send(t, "conversation.item.delete", item_id=first)
    assert isinstance(refused, Failed) and refused.exc.code == "unsupported"


def test_deleting_the_reply_in_progress_cancels_it() -> None:
    t = translator()
    text_mode(t)
    item_id = t.server(ReplyStarted("r1", "u1"))[1]["item"]["id"]
    outs = send(t, "conversation.item.delete", item_id=item_id)
    assert types(outs) == ["StopAudio", "Cancel", "conversation.item.deleted"]
    end = t.server(ReplyCancelled("r1", "client", "x"))
    assert "response.done" in types(end)
    assert isinstance(send(t, "conversation.item.retrieve", item_id=item_id)[0], Failed)
