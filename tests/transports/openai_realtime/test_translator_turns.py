"""The translator, event by event: session, input audio and user turns (no network)."""

from __future__ import annotations

import numpy as np

from tests.transports.openai_realtime.support import b64, events, send, translator, types
from voice_agent.protocol import ReplyStarted, SpeechStartedEvent, SpeechStoppedEvent
from voice_agent.transports.openai_realtime import transcripts
from voice_agent.transports.openai_realtime.calls import Failed, Feed, Respond, Start, Transcribe
from voice_agent.transports.openai_realtime.codec import g711_encode
from voice_agent.transports.openai_realtime.translator import SPEAK_FIRST


def test_session_created_reports_the_server_settings() -> None:
    t = translator()
    [created] = t.opening()
    assert created["type"] == "session.created"
    session = created["session"]
    assert session["type"] == "realtime"
    assert session["model"] == "qwen2-audio"
    assert session["instructions"] == "server prompt"
    assert session["output_modalities"] == ["audio"]
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"]["type"] == "server_vad"


def test_session_update_answers_session_updated_and_starts_nothing() -> None:
    t = translator()
    outs = send(
        t,
        "session.update",
        session={"type": "realtime", "instructions": "be brief", "output_modalities": ["text"]},
    )
    assert types(outs) == ["session.updated"]
    session = outs[0]["session"]
    assert session["instructions"] == "be brief"
    assert session["output_modalities"] == ["text"]
    assert t.started is None  # the LiveSession starts with the first input


def test_the_first_audio_starts_the_session_with_the_settings() -> None:
    t = translator()
    send(t, "session.update", session={"instructions": "be brief"})
    pcm = np.arange(480, dtype="<i2").tobytes()
    outs = send(t, "input_audio_buffer.append", audio=b64(pcm))
    assert types(outs) == ["Start", "Feed"]
    start, feed = outs
    assert isinstance(start, Start) and isinstance(feed, Feed)
    assert start.sample_rate == 24000
    assert start.config.system_prompt == "be brief"
    assert feed.pcm == pcm  # 24 kHz PCM16 as sent: the Session resamples it (soxr)
    assert types(send(t, "input_audio_buffer.append", audio=b64(pcm))) == ["Feed"]


def test_g711_input_is_decoded_at_8_khz() -> None:
    t = translator()
    send(t, "session.update", session={"audio": {"input": {"format": {"type": "audio/pcmu"}}}})
    pcm = (np.sin(np.arange(160) / 3) * 8000).astype("<i2").tobytes()
    outs = send(t, "input_audio_buffer.append", audio=b64(g711_encode(pcm, "audio/pcmu")))
    start, feed = outs
    assert isinstance(start, Start) and start.sample_rate == 8000
    assert isinstance(feed, Feed) and len(feed.pcm) == len(pcm)


def test_server_vad_options_map_onto_the_segmenter() -> None:
    t = translator()
    send(
        t,
        "session.update",
        session={
            "audio": {
                "input": {
                    "turn_detection": {
                        "type": "server_vad",
                        "silence_duration_ms": 700,
                        "prefix_padding_ms": 200,
                        "threshold": 1.0,
                        "interrupt_response": False,
                    }
                }
            }
        },
    )
    [start, _] = send(t, "input_audio_buffer.append", audio=b64(bytes(4)))
    assert isinstance(start, Start)
    vad = start.config.vad
    assert (vad.hangover_ms, vad.preroll_ms, vad.aggressiveness) == (700, 200, 3)
    assert start.config.barge_in_ms == 0


def test_semantic_vad_eagerness_sets_the_end_of_turn_threshold() -> None:
    t = translator()
    td = {"type": "semantic_vad", "eagerness": "high"}
    send(t, "session.update", session={"audio": {"input": {"turn_detection": td}}})
    [start, _] = send(t, "input_audio_buffer.append", audio=b64(bytes(4)))
    assert isinstance(start, Start)
    assert start.config.turn_threshold == 0.3


def test_a_turn_detection_change_restarts_the_session_on_its_conversation() -> None:
    t = translator()
    send(t, "input_audio_buffer.append", audio=b64(bytes(4)))
    td = {"type": "server_vad", "silence_duration_ms": 900}
    outs = send(t, "session.update", session={"audio": {"input": {"turn_detection": td}}})
    assert types(outs) == ["Start", "session.updated"]
    assert isinstance(outs[0], Start) and not outs[0].fresh
    assert outs[0].config.vad.hangover_ms == 900


def test_vad_speech_events_become_input_audio_buffer_events_and_a_user_item() -> None:
    t = translator()
    [started] = t.server(SpeechStartedEvent("u1", 120))
    assert started["type"] == "input_audio_buffer.speech_started"
    assert started["audio_start_ms"] == 120
    item_id = started["item_id"]
    stopped = t.server(SpeechStoppedEvent("u1", 120, 900, "silence"))
    assert types(stopped) == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert stopped[0]["audio_end_ms"] == 900
    assert {e.get("item_id", e.get("item", {}).get("id")) for e in stopped} == {item_id}
    item = stopped[2]["item"]
    assert item["role"] == "user" and item["content"][0]["type"] == "input_audio"
    retrieved = send(t, "conversation.item.retrieve", item_id=item_id)
    assert retrieved[0]["item"]["id"] == item_id


def test_commit_in_vad_mode_closes_the_open_utterance() -> None:
    t = translator()
    outs = send(t, "input_audio_buffer.commit", event_id="c1")
    assert isinstance(outs[0], Failed)
    assert outs[0].exc.code == "input_audio_buffer_commit_empty"
    assert outs[0].event_id == "c1"
    t.server(SpeechStartedEvent("u1", 0))
    assert types(send(t, "input_audio_buffer.commit")) == ["Commit"]


def test_manual_turn_buffers_commits_and_responds() -> None:
    t = translator()
    send(t, "session.update", session={"audio": {"input": {"turn_detection": None}}})
    pcm = (np.sin(np.arange(24000) / 5) * 8000).astype("<i2").tobytes()
    assert send(t, "input_audio_buffer.append", audio=b64(pcm)) == []  # buffered here
    committed = send(t, "input_audio_buffer.commit")
    assert types(committed) == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    outs = send(t, "response.create")
    assert types(outs) == ["Start", "Respond"]
    respond = outs[1]
    assert isinstance(respond, Respond)
    assert respond.turn.audio is not None
    assert abs(len(respond.turn.audio) - 16000) < 50  # 1 s at 24 kHz -> 16 kHz
    assert respond.turn.text is None
    empty = send(t, "input_audio_buffer.commit")
    assert isinstance(empty[0], Failed)


def test_clear_empties_the_manual_buffer() -> None:
    t = translator()
    send(t, "session.update", session={"audio": {"input": {"turn_detection": None}}})
    send(t, "input_audio_buffer.append", audio=b64(bytes(480)))
    assert types(send(t, "input_audio_buffer.clear")) == ["input_audio_buffer.cleared"]
    assert isinstance(send(t, "input_audio_buffer.commit")[0], Failed)


def test_a_typed_item_then_response_create() -> None:
    t = translator()
    item = {"id": "mine", "type": "message", "role": "user", "content": []}
    item["content"] = [{"type": "input_text", "text": "hello"}]
    outs = send(t, "conversation.item.create", item=item)
    assert types(outs) == ["conversation.item.added", "conversation.item.done"]
    assert outs[0]["item"]["id"] == "mine"
    assert outs[0]["previous_item_id"] is None
    dup = send(t, "conversation.item.create", item=item)
    assert isinstance(dup[0], Failed) and dup[0].exc.code == "item_create_duplicate_item_id"
    outs = send(t, "response.create", response={"instructions": "answer in French"})
    respond = outs[-1]
    assert isinstance(respond, Respond)
    assert respond.turn.text == "hello\nanswer in French"


def test_response_create_without_input_replies_to_the_conversation_as_it_stands() -> None:
    t = translator()
    outs = send(t, "response.create", event_id="r1")  # Pipecat's "bot speaks first"
    assert types(outs) == ["Start", "Respond"]
    assert isinstance(outs[1], Respond) and outs[1].turn.text == SPEAK_FIRST


def test_root_is_the_end_of_an_empty_conversation() -> None:
    t = translator()
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    first = send(t, "conversation.item.create", item=item, previous_item_id="root")
    assert types(first) == ["conversation.item.added", "conversation.item.done"]
    last = first[0]["item"]["id"]
    assert types(send(t, "conversation.item.create", item=item, previous_item_id=last))[0] == (
        "conversation.item.added"
    )
    [refused] = send(t, "conversation.item.create", item=item, previous_item_id="root")
    assert isinstance(refused, Failed) and refused.exc.code == "unsupported"


def test_pending_items_may_be_deleted_heard_ones_not() -> None:
    t = translator()
    item = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}
    item_id = events(send(t, "conversation.item.create", item=item))[0]["item"]["id"]
    assert types(send(t, "conversation.item.delete", item_id=item_id)) == [
        "conversation.item.deleted"
    ]
    assert isinstance(send(t, "conversation.item.retrieve", item_id=item_id)[0], Failed)
    item_id = events(send(t, "conversation.item.create", item=item))[0]["item"]["id"]
    send(t, "response.create")
    refused = send(t, "conversation.item.delete", item_id=item_id)
    assert isinstance(refused[0], Failed) and refused[0].exc.code == "unsupported"


def test_refused_things_name_themselves_and_change_nothing() -> None:
    t = translator()
    for kind, fields in [
        ("session.update", {"session": {"tools": [{"type": "function", "name": "f"}]}}),
        ("session.update", {"session": {"type": "transcription"}}),
        ("response.create", {"response": {"tools": [{"type": "function", "name": "f"}]}}),
        ("conversation.item.create", {"item": {"type": "function_call_output"}}),
    ]:
        [failed] = send(t, kind, **fields)
        assert isinstance(failed, Failed), kind
        assert failed.exc.code == "unsupported", kind
    assert t.settings.output_modalities == ("audio",)


def test_empty_tools_and_livekit_defaults_are_accepted() -> None:
    t = translator()
    session = {
        "type": "realtime",
        "model": "qwen2-audio",
        "tools": [],
        "tool_choice": "auto",
        "tracing": None,
        "max_output_tokens": "inf",
        "output_modalities": ["audio"],
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "noise_reduction": None,
                "turn_detection": {
                    "type": "semantic_vad",
                    "create_response": True,
                    "eagerness": "medium",
                    "interrupt_response": True,
                },
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "speed": 1.0,
                "voice": "marin",
            },
        },
    }
    assert types(send(t, "session.update", session=session)) == ["session.updated"]
    session["audio"]["input"]["noise_reduction"] = {"type": "near_field"}  # type: ignore[index]
    outs = send(t, "session.update", session=session)
    assert types(outs) == ["session.updated", "Failed"]  # the rest applies; noise_reduction refused
    assert isinstance(outs[1], Failed) and "noise_reduction" in str(outs[1].exc)


def speech_then_silence() -> bytes:
    t = np.arange(24000) / 24000
    voice = np.sin(2 * np.pi * 220 * t) * 8000 * (1 + np.sin(2 * np.pi * 3 * t)) / 2
    return voice.astype("<i2").tobytes() + bytes(2 * 24000)


def test_create_response_false_cuts_turns_here_and_waits_for_response_create() -> None:
    t = translator()
    td = {"type": "server_vad", "create_response": False, "silence_duration_ms": 400}
    send(t, "session.update", session={"audio": {"input": {"turn_detection": td}}})
    audio = speech_then_silence()
    outs = []
    for i in range(0, len(audio), 4800):
        outs += send(t, "input_audio_buffer.append", audio=b64(audio[i : i + 4800]))
    assert types(outs) == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    assert t.started is None  # nothing went to the Session
    respond = send(t, "response.create")
    assert types(respond) == ["Start", "Respond"]
    assert isinstance(respond[1], Respond) and respond[1].turn.audio is not None
    # speech while a response generates cancels it (interrupt_response)
    t.server(ReplyStarted("r1", None))
    again = []
    for i in range(0, len(audio), 4800):
        again += send(t, "input_audio_buffer.append", audio=b64(audio[i : i + 4800]))
    assert types(again)[:3] == ["input_audio_buffer.speech_started", "StopAudio", "Cancel"]


def test_transcription_is_asked_for_each_user_audio_item() -> None:
    t = translator()
    transcription = {"model": "gpt-4o-mini-transcribe", "language": "en"}
    outs = send(t, "session.update", session={"audio": {"input": {"transcription": transcription}}})
    assert types(outs) == ["session.updated"]
    assert outs[0]["session"]["audio"]["input"]["transcription"] == transcription
    audio = speech_then_silence()
    for i in range(0, len(audio), 4800):
        send(t, "input_audio_buffer.append", audio=b64(audio[i : i + 4800]))
    t.server(SpeechStartedEvent("u1", 100))
    outs = list(t.server(SpeechStoppedEvent("u1", 100, 900)))
    assert types(outs)[-1] == "Transcribe"
    call = outs[-1]
    assert isinstance(call, Transcribe) and call.language == "en"
    # from 100 ms minus the 300 ms pre-roll (clipped at 0) to 900 ms, at 16 kHz
    assert len(call.audio) == 900 * 16
    item_id = call.item_id
    delta = transcripts.delta(t.ids, item_id, "hel")
    assert delta["type"] == "conversation.item.input_audio_transcription.delta"
    done = transcripts.completed(t.ids, t.items, item_id, "hello", 0.9)
    assert done["type"] == "conversation.item.input_audio_transcription.completed"
    assert done["transcript"] == "hello" and done["usage"]["type"] == "duration"
    item = send(t, "conversation.item.retrieve", item_id=item_id)[0]["item"]
    assert item["content"][0]["transcript"] == "hello"
    failed = transcripts.failed(t.ids, item_id, RuntimeError("secret"))
    assert failed["error"]["code"] == "internal" and "secret" not in failed["error"]["message"]


def test_transcription_is_off_by_default() -> None:
    t = translator()
    t.server(SpeechStartedEvent("u1", 0))
    assert "Transcribe" not in types(list(t.server(SpeechStoppedEvent("u1", 0, 900))))
