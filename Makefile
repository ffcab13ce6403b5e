# make run: set up .venv and run the daemon with the built-in trainer in the foreground.
# make test: set up .venv and run the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup clean install-unit bench

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet -c constraints.txt "torch==2.13.0"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[train,test]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/ckpt-daemon run --config config.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

bench: $(STAMP)
	$(BIN)/python -m benchmarks

install-unit: $(STAMP)
	$(BIN)/ckpt-daemon install-unit --config $(CURDIR)/config.yaml

clean:
	rm -rf $(VENV) *.egg-info
