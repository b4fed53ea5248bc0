"""ReplySpeaker pacing, cancel and playback reports, on a fake clock.

The engine is a stand-in that returns exactly one second of tone per piece
(sample counts are then exact); the clock only moves when the speaker sleeps,
so every bound below is checked in audio samples against clock time, never
against the wall clock.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from tests.helpers.clocks import FakeClock
from tests.helpers.tts import ToneTTS
from voice_agent.protocol import (
    ReplyAudioDone,
    ReplyAudioStarted,
    ReplyCancelled,
    ReplyDelta,
    ReplyDone,
    ReplyStarted,
    ServerEvent,
)
from voice_agent.tts.speaker import AUDIO_LEAD_MS, ReplySpeaker, Speech

pytestmark = pytest.mark.timeout(30)

RATE = 16000
FRAME_MS = 40
# Four pieces (the first cut after three words), one second of audio each.
TEXT = "One two three four five six. Seven eight nine ten. Eleven twelve thirteen."
PIECES = 4


@dataclass
class Out:
    """What the speaker handed to the transport, with the fake time of each."""

    clock: FakeClock
    events: list[tuple[float, ServerEvent]] = field(default_factory=list)
    frames: list[tuple[float, int]] = field(default_factory=list)  # (time, samples)
    playback: list[tuple[float, str, bool]] = field(default_factory=list)

    async def event(self, event: ServerEvent) -> None:
        self.events.append((self.clock(), event))

    async def audio(self, pcm: bytes) -> None:
        self.frames.append((self.clock(), len(pcm) // 2))

    async def played(self, reply_id: str, playing: bool) -> None:
        self.playback.append((self.clock(), reply_id, playing))

    @property
    def samples(self) -> int:
        return sum(n for _, n in self.frames)

    def ahead_s(self) -> list[float]:
        """After each frame: audio sent minus clock time since the first frame."""
        t0 = self.frames[0][0]
        out, sent = [], 0
        for t, n in self.frames:
            sent += n
            out.append(sent / RATE - (t - t0))
        return out


@pytest.fixture
def speech() -> Speech:
    return Speech(ToneTTS())


def make(speech: Speech, lead_ms: int = AUDIO_LEAD_MS) -> tuple[ReplySpeaker, Out]:
    """A speaker on a fresh fake clock, and what it hands to the transport."""
    clock = FakeClock()
    out = Out(clock)
    speaker = ReplySpeaker(
        speech,
        RATE,
        out.event,
        out.audio,
        frame_ms=FRAME_MS,
        lead_ms=lead_ms,
        on_playback=out.played,
        clock=clock,
        sleep=clock.sleep,
    )
    return speaker, out


def say(speaker: ReplySpeaker, text: str = TEXT, reply_id: str = "r1") -> None:
    speaker.observe(ReplyStarted(reply_id, None))
    speaker.observe(ReplyDelta(reply_id, text))
    speaker.observe(ReplyDone(reply_id, text, {}, {}))


async def until(check: object, limit: int = 100_000) -> None:
    for _ in range(limit):
        if callable(check) and check():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


async def test_frames_are_paced_at_most_the_lead_ahead_of_the_clock(speech: Speech) -> None:
    speaker, out = make(speech)
    say(speaker)
    await until(lambda: out.playback and not out.playback[-1][2])
    assert out.samples == PIECES * RATE
    ahead = out.ahead_s()
    lead = AUDIO_LEAD_MS / 1000
    assert max(ahead) <= lead + 1e-6  # never more than the lead ahead of real time
    assert max(ahead) >= lead - FRAME_MS / 1000  # and the lead is used (a small buffer)
    first_frame, last_frame = out.frames[0][0], out.frames[-1][0]
    # paced: four seconds of audio took the clock about four seconds, minus the lead
    assert last_frame - first_frame == pytest.approx(PIECES - lead, abs=FRAME_MS / 1000 + 1e-6)
    kinds = [type(e) for _, e in out.events]
    assert kinds == [ReplyAudioStarted, ReplyAudioDone]
    done = out.events[-1][1]
    assert done == ReplyAudioDone("r1", PIECES * 1000, False)
    speech.close()


async def test_playback_is_reported_until_the_audio_has_been_heard(speech: Speech) -> None:
    speaker, out = make(speech)
    say(speaker)
    await until(lambda: len(out.events) == 2)  # reply.audio.done: all frames sent
    assert speaker.speaking  # but still playing on the client
    await until(lambda: len(out.playback) == 2)
    (t_on, r_on, on), (t_off, r_off, off) = out.playback
    assert (r_on, on, r_off, off) == ("r1", True, "r1", False)
    assert t_on == out.frames[0][0]
    assert t_off == pytest.approx(t_on + PIECES, abs=1e-6)  # the play head's end
    assert out.events[1][0] < t_off  # done came before the end of playback
    assert not speaker.speaking
    speech.close()


async def test_cancel_stops_frames_and_bounds_what_was_sent_ahead(speech: Speech) -> None:
    speaker, out = make(speech)
    say(speaker)
    await until(lambda: out.samples >= RATE * 3 // 2)  # 1.5 s of audio sent
    t_cancel = out.clock()
    sent = out.samples
    speaker.observe(ReplyCancelled("r1", "barge_in", TEXT))
    assert not speaker.speaking
    await until(lambda: len(out.playback) == 2)
    for _ in range(100):
        await asyncio.sleep(0)  # anything still scheduled would run now
    # nothing after the cancel ...
    assert out.samples == sent
    # ... and what the client had beyond what it played was at most the lead
    beyond_s = sent / RATE - (t_cancel - out.frames[0][0])
    assert 0 < beyond_s <= AUDIO_LEAD_MS / 1000 + 1e-6
    done = out.events[-1][1]
    assert done == ReplyAudioDone("r1", sent * 1000 // RATE, True)
    assert [(r, p) for _, r, p in out.playback] == [("r1", True), ("r1", False)]
    assert out.playback[-1][0] == t_cancel  # playing ends at once
    speech.close()


async def test_stop_with_another_reply_id_does_nothing(speech: Speech) -> None:
    speaker, out = make(speech)
    say(speaker)
    await until(lambda: out.samples > 0)
    speaker.stop("r0")
    assert speaker.speaking and speaker.reply_id == "r1"
    speaker.stop("r1")
    assert not speaker.speaking
    await speaker.close()
    speech.close()


async def test_a_new_reply_ends_the_old_ones_playback(speech: Speech) -> None:
    speaker, out = make(speech)
    say(speaker, "Short one.", "r1")
    await until(lambda: len(out.events) == 2)  # r1 sent, still playing
    say(speaker, "Second one.", "r2")
    await until(lambda: any(e == ReplyAudioDone("r2", 1000, False) for _, e in out.events))
    await until(lambda: len(out.playback) == 4)
    assert [(r, p) for _, r, p in out.playback] == [
        ("r1", True),
        ("r1", False),
        ("r2", True),
        ("r2", False),
    ]
    # r1 was all sent: its reply.audio.done is not repeated as cancelled
    assert [e for _, e in out.events if isinstance(e, ReplyAudioDone)] == [
        ReplyAudioDone("r1", 1000, False),
        ReplyAudioDone("r2", 1000, False),
    ]
    speech.close()


async def test_lead_zero_sends_as_fast_as_made(speech: Speech) -> None:
    speaker, out = make(speech, lead_ms=0)
    say(speaker)
    await until(lambda: len(out.events) == 2)
    assert out.samples == PIECES * RATE
    assert {t for t, _ in out.frames} == {out.frames[0][0]}  # no clock time passed
    await speaker.close()
    speech.close()


async def test_the_first_piece_is_cut_early(speech: Speech) -> None:
    speaker, out = make(speech)
    say(speaker)
    await until(lambda: len(out.events) == 2)
    assert isinstance(speech.tts, ToneTTS)
    assert speech.tts.said == [
        "One two three",
        "four five six.",
        "Seven eight nine ten.",
        "Eleven twelve thirteen.",
    ]
    await speaker.close()
    speech.close()
