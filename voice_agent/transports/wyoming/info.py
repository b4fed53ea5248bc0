"""The `info` answered to `describe` (pure): what this server offers.

- asr: one program, "voice_agent", whose one model is the engine's model
  (Qwen2-Audio transcribes as one of its trained tasks); transcript streaming
  (transcript-start/-chunk/-stop) supported;
- handle: one program, the conversation agent on the same model (the
  --devices allowlist in its prompt, commands published on MQTT);
- tts: one program with the server's one voice when the server speaks
  (--tts), streaming synthesis (synthesize-start/-chunk/-stop) supported;
  absent with --tts none.

Languages: the ones Qwen2-Audio was trained to hear and answer; the spoken
voice's is its own (Piper's joe is English).
"""

from __future__ import annotations

from wyoming.info import (
    AsrModel,
    AsrProgram,
    Attribution,
    HandleModel,
    HandleProgram,
    Info,
    TtsProgram,
    TtsVoice,
)

from voice_agent import __version__

PROGRAM = "voice_agent"
ATTRIBUTION = Attribution(name="voice_agent", url="")  # self-hosted: no public page
MODEL_ATTRIBUTION = Attribution(name="Qwen", url="https://github.com/QwenLM/Qwen2-Audio")
# Qwen2-Audio's languages (its paper: 8+ languages for speech recognition and chat).
LANGUAGES = ["en", "zh", "de", "es", "fr", "it", "ja", "ko", "pt", "ru", "nl", "yue"]
VOICE_LANGUAGES = ["en"]


def build_info(model_name: str, voice: str | None, *, demo: bool = False) -> Info:
    """The info event's body for a server on `model_name` speaking with
    `voice` (None: the server does not speak)."""
    model = model_name or "qwen2-audio"
    note = " (demo model: replies are random noise)" if demo else ""
    asr = AsrProgram(
        name=PROGRAM,
        attribution=ATTRIBUTION,
        installed=True,
        description=f"Qwen2-Audio speech to text{note}",
        version=__version__,
        models=[
            AsrModel(
                name=model,
                attribution=MODEL_ATTRIBUTION,
                installed=True,
                description="Qwen2-Audio transcription",
                version=None,
                languages=list(LANGUAGES),
            )
        ],
        supports_transcript_streaming=True,
    )
    handle = HandleProgram(
        name=PROGRAM,
        attribution=ATTRIBUTION,
        installed=True,
        description=f"voice_agent conversation agent{note}",
        version=__version__,
        models=[
            HandleModel(
                name=model,
                attribution=MODEL_ATTRIBUTION,
                installed=True,
                description="Qwen2-Audio conversation",
                version=None,
                languages=list(LANGUAGES),
            )
        ],
        supports_handled_streaming=False,
    )
    tts: list[TtsProgram] = []
    if voice is not None:
        tts.append(
            TtsProgram(
                name=PROGRAM,
                attribution=ATTRIBUTION,
                installed=True,
                description="voice_agent text to speech",
                version=__version__,
                voices=[
                    TtsVoice(
                        name=voice,
                        attribution=ATTRIBUTION,
                        installed=True,
                        description=voice,
                        version=None,
                        languages=list(VOICE_LANGUAGES),
                    )
                ],
                supports_synthesize_streaming=True,
            )
        )
    return Info(asr=[asr], handle=[handle], tts=tts)
