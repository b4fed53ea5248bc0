#!/bin/sh
# Container entrypoint of the voice_agent images (deploy/Dockerfile, deploy/Dockerfile.gpu).
#
#   (no arguments)             voice-agent serve              settings from VOICE_AGENT_* env vars
#   --flag ...                 voice-agent serve --flag ...
#   serve-model --port 8000    voice-agent serve-model ...    (any voice-agent subcommand:
#   sessions list              voice-agent sessions list       serve, serve-model, ask, client,
#   make-tiny-model /data/t    voice-agent make-tiny-model ... sessions, make-tiny-model, bench)
#   help                       voice-agent --help
#   voice-agent ... | sh | python ...   run as given (any command on PATH or a path)
#
# Model weights: VOICE_AGENT_MODEL when set; else the directory mounted at
# $MODEL_MOUNT (default /models/Qwen2-Audio-7B-Instruct) when it holds a model;
# else nothing, and `serve` falls back as it does outside a container (the default
# model from the Hugging Face cache, or the tiny demo model, loudly announced).
#
# The program replaces this shell (exec), so it receives SIGTERM directly and
# drains its sessions.
set -eu

MODEL_MOUNT="${MODEL_MOUNT:-/models/Qwen2-Audio-7B-Instruct}"
if [ -z "${VOICE_AGENT_MODEL:-}" ]; then
    unset VOICE_AGENT_MODEL # set but empty (compose's ${VOICE_AGENT_MODEL:-}) means unset
    if [ -f "$MODEL_MOUNT/config.json" ]; then
        VOICE_AGENT_MODEL="$MODEL_MOUNT"
        export VOICE_AGENT_MODEL
    fi
fi

if [ "$#" -eq 0 ]; then
    set -- serve
fi

case "$1" in
    -*)
        set -- voice-agent serve "$@"
        ;;
    help)
        shift
        set -- voice-agent --help "$@"
        ;;
    serve | serve-model | ask | client | sessions | make-tiny-model | bench)
        set -- voice-agent "$@"
        ;;
    *)
        # A command on PATH or a path runs as given; any other word is taken for a
        # voice-agent subcommand (an unknown one gets voice-agent's usage message).
        if ! command -v "$1" >/dev/null 2>&1; then
            set -- voice-agent "$@"
        fi
        ;;
esac

exec "$@"
