# UNMERGE — `make run` runs the quickstart, `make test` the test suite. Both need only `make install`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MANIFEST ?= experiments/quickstart.toml

.PHONY: install run test test-slow bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,plots,datasets]"
	touch $(STAMP)

run: install
	$(BIN)/unmerge run $(MANIFEST)

test: install
	$(BIN)/python -m pytest -m "not slow" -q

test-slow: install
	$(BIN)/python -m pytest -m slow -q

clean:
	rm -rf runs .pytest_cache
