# Quick start:  make test   |   make demo
# Both create .venv (Python 3.11) if missing and install everything; a second run installs nothing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.s2m2-installed

.PHONY: setup test test-slow test-all demo bench clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml tools/build_learn2learn.sh
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -r requirements.txt
	bash tools/build_learn2learn.sh $(PY)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# Default suite: < 15 min on 2 cores. Slow tests (marked `slow`) run in `make test-slow`.
test: setup
	$(PY) -m pytest -q -m "not slow" tests

test-slow: setup
	$(PY) -m pytest -q -m slow tests

test-all: setup
	$(PY) -m pytest -q tests

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) scripts/bench_prepare.py
	$(PY) scripts/bench_train.py
	$(PY) scripts/bench_evaluate.py
	$(PY) scripts/bench_models.py

clean-venv:
	rm -rf $(VENV)
