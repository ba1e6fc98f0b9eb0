# Two entry points, both idempotent: the first run creates .venv and installs the pinned
# requirements; later runs install nothing unless a requirements file changed.
#   make repro   pull what the DVC remote holds and run the whole DAG (dvc repro)
#   make test    run the test suite (with the S3 remote test's requirements)
# .venv is built with PYTHON, by default the first of python3.11, python3.12, python3.13,
# python3 that is 3.11-3.14 (scripts/pick-python.sh says what it found when none is).
PYTHON ?=
VENV ?= .venv
REQUIREMENTS ?= requirements.txt
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed-$(REQUIREMENTS)
TEST_INSTALLED := $(VENV)/.installed-requirements-test.txt

.PHONY: repro test install
# Stage commands run `python`: put the venv first on PATH so they use it.
# pipeline.commands refuses params that would put shell code into a stage's command, before
# anything runs (dvc.yaml's check_params stage does the same for a plain `dvc repro`).
# pipeline.pull is `dvc pull --allow-missing` that says in one line what dvc repro will compute
# instead of listing every output the remote does not hold yet.
repro: $(INSTALLED)
	$(BIN)/python -m pipeline.commands
	PATH="$(abspath $(BIN)):$$PATH" python -m pipeline.pull
	PATH="$(abspath $(BIN)):$$PATH" dvc repro

test: $(INSTALLED) $(TEST_INSTALLED)
	$(BIN)/python -m pytest -q

install: $(INSTALLED)

$(INSTALLED): $(REQUIREMENTS) requirements-base.txt
	@test -x $(BIN)/python || { py="$(PYTHON)"; [ -n "$$py" ] || py=$$(sh scripts/pick-python.sh) || exit 1; \
		echo "$$py -m venv $(VENV)"; $$py -m venv $(VENV); }
	$(BIN)/python -m pip install -q -r $(REQUIREMENTS)
	touch $@

$(TEST_INSTALLED): requirements-test.txt requirements-s3.txt $(INSTALLED)
	$(BIN)/python -m pip install -q -r requirements-test.txt
	touch $@
