# The README's two quick-start commands: `make demo` and `make test`.
# Each creates its own virtual environment (.venv) on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# asv: how many commits of main `bench-history` runs, the slowdown `bench-gate` fails on,
# and optionally a benchmark regex for both. Both run the whole suite (this tree's
# benchmarks/) against each commit's numbabn/ and keras_layer/ in this environment
# (benchmarks/asv_commits.sh). The whole suite takes 339-397 s a commit whose code differs
# from the one before (it compiles), 256-292 s one whose numbabn/ and keras_layer/ a commit
# before it in the run had (the compiled copy is reused), on the 2-core machine at load
# ~1.2; N=10 took 52 min 52 s end to end from a fresh clone, environment included
# (2026-12-02, README "Performance history"); load 2-3 adds 25-40 %. BENCH narrows it;
# NUMBABN_BENCH_FULL=1 adds ResNet50 and the models' fused and no-BN variants (~+2 min).
N ?= 10
FACTOR ?= 1.5
BENCH ?=
ASV_BENCH := $(if $(BENCH),-b "$(BENCH)",)
# the gate's base: where HEAD left main (main itself may have moved on since)
GATE_BASE ?= $$(git merge-base main HEAD)
# where bench-gate keeps the two commits' extracted, compiled code (absolute: asv's
# ASV_PYTHONPATH must be); benchmarks/ab_gate.py looks there
GATE_CODE := $(CURDIR)/.asv/code
ASV_COMMITS := ASV=$(BIN)/asv ASV_ARGS='$(ASV_BENCH)' benchmarks/asv_commits.sh
# the PyTorch the test environment gets, installed before numbabn[torch] so that pip keeps
# it: an exact version whose CPU-only wheel pip finds locally here; a looser spec lets pip
# pick the default build from PyPI, a multi-GB CUDA one on Linux. Elsewhere, e.g.
# TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0

.PHONY: demo demo-numpy demo-torch test bench bench-history bench-gate bench-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# each environment also builds numbabn's TensorFlow op (keras_layer/_native; ~20 s once)
# and, with PyTorch, its PyTorch op (numbabn/torch/_native; ~40 s once); each is skipped
# with a note where there is no C++ compiler
OP_SOURCE := keras_layer/_native/numbabn_ops.cc numbabn/_native/buffer_pool.h numbabn/_native/entry_points.h
TORCH_OP_SOURCE := numbabn/torch/_native/numbabn_torch.cc numbabn/_native/buffer_pool.h \
	numbabn/_native/entry_points.h

$(VENV)/.demo: $(BIN)/python pyproject.toml $(OP_SOURCE)
	$(BIN)/pip install --quiet -e ".[demo]"
	$(BIN)/python -m keras_layer._native
	touch $@

$(VENV)/.test: $(BIN)/python pyproject.toml $(OP_SOURCE) $(TORCH_OP_SOURCE)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[test,demo]"
	$(BIN)/python -m keras_layer._native
	$(BIN)/python -m numbabn.torch._native
	touch $@

$(VENV)/.bench: $(BIN)/python pyproject.toml $(OP_SOURCE) $(TORCH_OP_SOURCE)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[bench,torch]"
	$(BIN)/python -m keras_layer._native
	$(BIN)/python -m numbabn.torch._native
	touch $@

## demo: LeNet with BN on digits in Keras, stock layer vs numbabn's, prints the comparison
demo: $(VENV)/.demo
	$(BIN)/python demo/lenet_digits.py

## demo-numpy: an MLP with BN trained in plain NumPy, numbabn vs a NumPy implementation
demo-numpy: $(VENV)/.demo
	$(BIN)/python demo/mlp_digits.py

# demo-torch: PyTorch ($(TORCH), see above) and scikit-learn only, no TensorFlow
$(VENV)/.demo-torch: $(BIN)/python pyproject.toml $(TORCH_OP_SOURCE)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[torch]" "scikit-learn>=1.3"
	$(BIN)/python -m numbabn.torch._native
	touch $@

## demo-torch: the seeds' LeNet with BN on digits in PyTorch, stock nn.BatchNorm vs numbabn's, prints the comparison
demo-torch: $(VENV)/.demo-torch
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python demo/lenet_digits_torch.py

## test: the whole test suite
# on TEST_WORKERS processes (pytest-xdist; worksteal: the long tests are uneven). Most of a
# fresh clone's test time is Numba compiling kernels cold, one core a process: on the
# 2-core machine the suite took 16 min 29 s in one process and 10 min 52 s in two, cold
# cache both (2026-12-01); TEST_WORKERS=0 runs it in this process.
TEST_WORKERS ?= 2
test: $(VENV)/.test
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

## bench: kernel, Keras-layer, PyTorch-module and whole-model (ResNet50, MobileNetV2, with a profiler trace of their BN layers; LeNet, ResNet-18 in PyTorch) speed tables (floor, TensorFlow's fused kernel, stock layer, torch.nn)
bench: $(VENV)/.bench
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/report.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/overhead_report.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/keras_report.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/model_report.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/model_trace.py
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python benchmarks/torch_report.py

$(HOME)/.asv-machine.json: $(VENV)/.bench
	$(BIN)/asv machine --yes

## bench-history: the whole asv suite over the last N commits of main (first parent; commits with results are skipped), HTML report, PNG
bench-history: $(HOME)/.asv-machine.json
	SKIP_EXISTING=1 $(ASV_COMMITS) $$(git rev-list --first-parent --reverse -n $(N) main)
	$(BIN)/asv publish
	$(BIN)/python benchmarks/plot_history.py --out benchmarks/history.png
	@echo "Report in .asv/html; browse it with: $(BIN)/asv preview"

## bench-gate: the whole suite on HEAD, then HEAD's kernels against its merge base's in turns in one process; fails when a kernel is slower, or a call takes more memory, by more than FACTOR (GATE_BASE_SUITE=1: the whole suite on the base first, to compare every figure)
# benchmarks/gate.py fails on a figure HEAD's run did not produce (a benchmark failed,
# e.g. a kernel failing its float64 check) and lists every figure that moved since the
# base's stored results, where there are any (bench-history keeps main's), for
# information. benchmarks/ab_gate.py loads both commits' numbabn into one process (HEAD's
# from the copy its run compiled, GATE_CODE) and times every kernel of both on the same
# arrays in turns, on 1 and 2 threads, then each allocating call's peak memory: main
# against main moved by at most 1.12-1.29x, a kernel doing its pass twice read 1.64-2.25x
# in every large case that runs it. From a fresh clone: 8-9 min (2026-12-02, README).
GATE_BASE_SUITE ?=
bench-gate: $(HOME)/.asv-machine.json
	rm -rf $(GATE_CODE) .asv/gate-base.json
	$(if $(GATE_BASE_SUITE),CODE_ROOT=$(GATE_CODE) $(ASV_COMMITS) $(GATE_BASE) && cp "$$(ls -t .asv/results/*/$$(git rev-parse --short=8 $(GATE_BASE))-*.json | head -1)" .asv/gate-base.json,)
	CODE_ROOT=$(GATE_CODE) $(ASV_COMMITS) HEAD
	$(BIN)/python benchmarks/gate.py $(if $(GATE_BASE_SUITE),.asv/gate-base.json,$(GATE_BASE)) HEAD --factor $(FACTOR); gate=$$?; \
	$(BIN)/python benchmarks/ab_gate.py $(GATE_BASE) HEAD --factor $(FACTOR) --code $(GATE_CODE); ab=$$?; \
	rm -rf $(GATE_CODE); [ $$gate = 0 ] && [ $$ab = 0 ]

## bench-check: asv check, and every benchmark run once at a small size (in `make test` too)
bench-check: $(VENV)/.test
	$(BIN)/python -m pytest tests/test_benchmarks.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
