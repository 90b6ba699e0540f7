# The README's two quick-start commands: `make demo` and `make test`.
# Each creates its own virtual environment on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.demo: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[demo]"
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[test,demo]"
	touch $@

$(VENV)/.bench: $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet -e ".[bench]"
	touch $@

## demo: train a small BN network with numbabn and with plain NumPy, print the comparison
demo: $(VENV)/.demo
	$(BIN)/python demo/mlp_digits.py

## test: the whole test suite
test: $(VENV)/.test
	$(BIN)/python -m pytest

## bench: kernel speed against the copy-bandwidth floor and TensorFlow's fused kernel
bench: $(VENV)/.bench
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
