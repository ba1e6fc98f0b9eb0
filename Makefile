# Two entry points, both idempotent: the first run creates .venv and installs the pinned
# requirements; later runs install nothing unless a requirements file changed.
#   make repro   pull the data from the DVC remote and run the whole DAG (dvc repro)
#   make test    run the test suite
PYTHON ?= python3.11
VENV ?= .venv
REQUIREMENTS ?= requirements.txt
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed-$(REQUIREMENTS)

.PHONY: repro test install
# Stage commands run `python`: put the venv first on PATH so they use it.
repro: $(INSTALLED)
	PATH="$(abspath $(BIN)):$$PATH" dvc pull --allow-missing
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: $(INSTALLED)
	$(BIN)/python -m pytest -q

install: $(INSTALLED)

$(INSTALLED): $(REQUIREMENTS) requirements-base.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r $(REQUIREMENTS)
	touch $@
