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

# Mutation testing of the recipe's core modules (docs/testing.md): mutmut 3 (config: [tool.mutmut] in
# pyproject.toml), ONE child process, per mutant only the tests that ran the mutated function. Results
# persist in mutants/ (a rerun only tests new or changed mutants); `.venv/bin/mutmut results` lists
# survivors, `.venv/bin/mutmut show NAME` shows one. MUTANTS='s2m2.objectives.*' restricts the run.
.PHONY: mutation
MUTMUT_VERSION ?= 3.8.1
mutation: setup
	@$(VENV)/bin/mutmut --version >/dev/null 2>&1 || $(PY) -m pip install -q mutmut==$(MUTMUT_VERSION)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 S2M2_SHARED=$${S2M2_SHARED:-$(abspath ..)/shared} \
		$(VENV)/bin/mutmut run --max-children 1 $(MUTANTS)
	$(VENV)/bin/mutmut results
