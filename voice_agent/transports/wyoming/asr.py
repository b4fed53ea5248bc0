"""Speech to text: one Qwen2-Audio turn with a transcription instruction,
outside any conversation's history.

Each transcription runs on a throwaway engine conversation (a system prompt
that asks for the exact words, the clip plus the instruction as the user turn:
the model's audio analysis mode), released afterwards, so no conversation
ever sees it; the engine batches it with every other session's turns like any
turn. The pieces come back as they are decoded (transcript-chunk).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

from voice_agent.engine.base import Engine, TurnInput
from voice_agent.engine.types import SAMPLE_RATE, AudioArray

SYSTEM = "You transcribe speech. You answer with the exact words spoken and nothing else."
MAX_TOKENS = 256  # a transcript's tokens at most (30 s of speech is about 120 words)
MIN_SAMPLES = SAMPLE_RATE // 10  # shorter clips (100 ms) are not sent: an empty transcript


def instruction(language: str | None) -> str:
    """The user turn's text beside the clip."""
    text = "Transcribe this audio exactly."
    if language:
        text += f" The language is {language[:32]}."
    return text


async def transcribe(
    engine: Engine, audio: AudioArray, language: str | None = None
) -> AsyncIterator[str]:
    """The transcript's pieces as they are decoded (nothing for a clip under
    MIN_SAMPLES). Engine errors propagate; a cancelled caller cancels the turn."""
    if len(audio) < MIN_SAMPLES:
        return
    conversation = engine.new_conversation(
        SYSTEM, conversation_id=f"wyoming-transcript-{uuid.uuid4().hex[:12]}"
    )
    handle = None
    finished = False
    try:
        handle = engine.submit(
            conversation, TurnInput(audio=audio, text=instruction(language)), MAX_TOKENS
        )
        async for delta in handle:
            if delta.text:
                yield delta.text
        finished = True
    finally:
        if handle is not None and not finished:
            handle.cancel()
        engine.release(conversation)
