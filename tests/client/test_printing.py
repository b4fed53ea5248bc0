"""The client's event lines (voice-agent client prints them)."""

from __future__ import annotations

from voice_agent.client.printing import EventPrinter
from voice_agent.protocol import ReplyCancelled, SpeechStoppedEvent


def test_a_continued_utterance_and_a_taken_back_reply_say_so() -> None:
    joined = SpeechStoppedEvent("u2", 2880, 4700, "silence", None, "u1")
    assert EventPrinter.format(joined) == "speech.stopped u2 2880-4700 ms (silence, continues u1)"
    alone = SpeechStoppedEvent("u1", 1200, 1920, "silence")
    assert EventPrinter.format(alone) == "speech.stopped u1 1200-1920 ms (silence)"
    taken = ReplyCancelled("r1", "continued", "Sure")
    assert EventPrinter.format(taken) == "reply.cancelled r1 (continued)"
