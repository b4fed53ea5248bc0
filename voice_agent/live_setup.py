"""Turn-taking setup for live sessions: the Session settings of the server
config (session_config) and what is loaded once at server start
(prepare_turn_taking)."""

from __future__ import annotations

import logging
from functools import cache

from voice_agent.commands import DeviceList, prompt_text
from voice_agent.config import Config
from voice_agent.errors import ModelLoadError
from voice_agent.hub import load_devices
from voice_agent.session import SessionConfig
from voice_agent.turn import describe, load_detector, parse_rechecks
from voice_agent.vad import SileroModel, VadConfig, silero_model

logger = logging.getLogger("voice_agent.live")


def session_config(
    config: Config, system_prompt: str | None = None, devices: DeviceList | None = None
) -> SessionConfig:
    """The Session settings of the server config; `system_prompt` (from
    session.start) overrides the server's default. `devices` defaults to the
    `--devices` file (read once); with an allowlist the system prompt also
    lists the devices and the command format."""
    if devices is None:
        devices = load_devices(config.devices)
    prompt = system_prompt if system_prompt is not None else config.system_prompt
    if devices is not None:
        prompt = prompt_text(devices, prompt)
    detector = load_detector(config.turn_detection, config.turn_model)  # one per process
    rechecks = parse_rechecks(config.turn_rechecks) if detector is not None else ()
    return SessionConfig(
        vad=VadConfig(
            aggressiveness=config.vad_aggressiveness,
            preroll_ms=config.preroll_ms,
            hangover_ms=config.hangover_ms,
            min_speech_ms=config.min_speech_ms,
            max_utterance_ms=config.max_utterance_ms,
            vad=config.vad,
            turn_check=detector is not None,
            min_silence_ms=config.min_silence_ms,
            max_silence_ms=config.max_silence_ms,
            recheck_ms=tuple(ms for ms, _ in rechecks),
        ),
        barge_in_ms=config.barge_in_ms,
        barge_in_speaking_ms=config.barge_in_speaking_ms,
        continue_window_ms=config.continue_window_ms,
        continue_heard_ms=config.continue_heard_ms,
        speech_check=speech_check(config),
        max_queued_utterances=config.max_queued_utterances,
        max_text_chars=config.max_text_chars,
        system_prompt=prompt,
        devices=devices,
        turn_threshold=config.turn_threshold,
        turn_rechecks=rechecks,
        turn_detector=detector,
    )


@cache
def _silero_or_none() -> SileroModel | None:
    try:
        return silero_model()
    except (ModelLoadError, ImportError):
        return None


def speech_check(config: Config) -> SileroModel | None:
    """The Silero model that confirms resumed speech for continuation when
    the VAD is webrtcvad (which scores music and clatter as speech); None when
    continuation is off, the VAD is Silero already, or Silero is not
    installed (the `turn` extra): webrtcvad's voiced frames decide then."""
    if config.continue_window_ms <= 0 or config.barge_in_ms <= 0 or config.vad != "webrtc":
        return None
    return _silero_or_none()


def prepare_turn_taking(config: Config) -> None:
    """At server start: load the end-of-turn model and the Silero VAD (when
    asked for) once, fail early on a bad --turn-model, and log which end of
    turn detection runs (the silence fallback says so)."""
    detector = load_detector(config.turn_detection, config.turn_model)
    if config.vad == "silero":
        silero_model()
    line = describe(detector, config.hangover_ms)
    if config.turn_detection == "silence":
        line = (
            f"end of turn: silence alone ({config.hangover_ms} ms hangover); "
            "--turn-detection auto uses the end-of-turn model"
        )
    checked = config.continue_window_ms > 0 and config.barge_in_ms > 0 and config.vad == "webrtc"
    if checked and speech_check(config) is None:
        logger.warning(
            "continuation: Silero VAD is not installed (voice-agent[turn]); speech resuming "
            "within --continue-window-ms is judged by webrtcvad alone, which takes music "
            "and clatter for speech"
        )
    if detector is None and config.turn_detection == "auto":
        logger.warning(line)
    else:
        logger.info(line, extra={"vad": config.vad})
