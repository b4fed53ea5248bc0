# One-command set-up. `make run` and `make test` first check the Debian
# packages (scripts/system-deps: installs what is missing as root or with
# password-less sudo, else prints the one apt-get command to run), then create
# .venv and install the Python packages on first use; later runs reuse it
# until pyproject.toml or this Makefile changes.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8765
# CPU machines get the CPU build of torch (torch==2.13.0; plain `torch` would
# pull several GB of CUDA packages); machines with an NVIDIA driver get the
# normal CUDA build.
TORCH_SPEC := $(shell if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; \
                then echo 'torch>=2.4'; else echo 'torch==2.13.0'; fi)

# The Debian packages each goal needs: the test set for `make test` (and the
# slow benchmarks, which start the same tools), else the run set.
SYSTEM_DEPS := $(if $(filter test bench-all,$(MAKECMDGOALS)),test,run)

.PHONY: venv run test lint format clean bench bench-all system-deps

venv: $(STAMP)

# Checked before the venv is made, and on every run (well under a second when
# all is there).
system-deps:
	PYTHON='$(PYTHON)' VENV='$(VENV)' $(PYTHON) scripts/system-deps $(SYSTEM_DEPS)

$(STAMP): pyproject.toml Makefile | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[webrtc,mqtt,mic,turn,remote,tts,postgres,wyoming,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/voice-agent serve --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy voice_agent

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(VENV)/bin/pytest -q

bench: $(STAMP)
	$(PY) benchmarks/engine.py
	$(PY) benchmarks/ingest.py
	$(PY) benchmarks/tts.py

# The slow ones too (about 20 minutes; run on a quiet machine): real servers,
# mosquitto, Chromium, many streams. Each prints one JSON object.
bench-all: bench
	$(PY) benchmarks/load.py --set tts=none
	$(PY) benchmarks/voice.py
	$(PY) benchmarks/mqtt.py
	$(PY) benchmarks/webrtc.py
	$(PY) benchmarks/browser.py
	$(PY) benchmarks/turns.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
