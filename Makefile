# make run: set up .venv with what the daemon and the built-in trainer need, and run the daemon with the
#           built-in trainer in the foreground.
# make test: set up .venv with the test stack too (pytest, transformers, lightning, a local S3 server...),
#           and run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test

.PHONY: run test setup clean install-unit bench

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# What running needs: the daemon's dependencies and the extra `train` (torch, numpy, safetensors).
$(RUN_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[train]"
	touch $(RUN_STAMP)

# What the suite needs on top: the extra `test`.
$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[train,test]"
	touch $(TEST_STAMP)

setup: $(TEST_STAMP)

run: $(RUN_STAMP)
	$(BIN)/ckpt-daemon run --config config.yaml

test: $(TEST_STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2

bench: $(TEST_STAMP)
	$(BIN)/python -m benchmarks

install-unit: $(RUN_STAMP)
	$(BIN)/ckpt-daemon install-unit --config $(CURDIR)/config.yaml

clean:
	rm -rf $(VENV) *.egg-info
