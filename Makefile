# The two front-door commands (README): `make quickstart` and `make test`.
# Both create .venv on first use and (re)install qnetem in editable mode, which builds
# the C extension; they reinstall when the build inputs change.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.qnetem-installed
BUILD_INPUTS := pyproject.toml setup.py emulator/__init__.py emulator/kernels/_digest.py $(wildcard cext/*.c cext/*.h cext/*.py)

.PHONY: quickstart test test-fast bench clean

$(STAMP): $(BUILD_INPUTS)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

quickstart: $(STAMP)
	$(BIN)/qnetem run scenarios/two-node-epr.yaml

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not integration"

bench: $(STAMP)
	for b in bench/bench_*.py; do echo "# $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf build *.egg-info emulator/_cext*.so runs .pytest_cache
