# Two entry points on a fresh machine (see README "Quickstart"):
#   make demo   set up .venv and run a duplex conversation on the embedded demo model (example/model/)
#   make test   set up .venv (and the offline TTS engines when run as root) and run the test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup setup-tts demo test test-fast clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

setup: $(STAMP)

# TTS engines used by the corpus maker tests; best effort (needs root and Debian's apt).
setup-tts:
	@bash scripts/install_tts.sh || echo "TTS engines not installed: corpus tests needing them will be skipped"

demo: setup
	$(PY) duplex_inference.py duplex/duplex_demo.yaml --script example/conversation.yaml --output timeline.jsonl

test: setup setup-tts
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) .pytest_cache
