"""synchronized=True under MultiWorkerMirroredStrategy: 2 worker processes on localhost.

The workers (tests/keras_multiworker_worker.py) form a cluster through ``TF_CONFIG`` on
two free ports, with CPU collectives (``CommunicationImplementation.RING``), and train
Dense -> synchronized BN -> ReLU -> Dense with SGD for 5 steps of a custom loop, each
worker fed its own, differently sized share of the step's global batch through
``strategy.distribute_datasets_from_function``. One step gives worker 0 no examples and
another gives worker 1 none: TensorFlow and Keras let a replica run a step on an empty
batch (the Dense layers, the loss and the gradient all-reduce take it), and the
synchronized layer counts it as a part with zero elements. A third process trains the
same model, from the same initial weights, on the concatenated batches without a
strategy.

Every process runs under a deadline; if one fails or the deadline passes, all are killed
with SIGKILL (a TensorFlow worker catches SIGTERM, for preemption handling, and may not
stop on it) and the test fails with each one's exit status and output tail. That matters:
a worker whose peer never comes up waits for it forever (worker 0, the coordination
service's leader, blocks in the strategy's constructor; no ``CommunicationOptions``
timeout covers that wait), while one whose peer dies mid-training gets an
``UnavailableError`` from its next collective after ~10-15 s (the coordination
service's heartbeat).
"""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

import keras_multiworker_worker as mw
from process_group import WorkerFailure, free_ports, run_processes

HERE = Path(__file__).parent
WHAT = "multi-worker run"
WORKER = HERE / "keras_multiworker_worker.py"

# Wall-clock limit for a whole run. A healthy one takes ~15-25 s on 2 busy cores: three
# TensorFlow start-ups, the cluster handshake, one trace and 5 steps.
TIMEOUT = 150
# A short one for the test of a missing worker (it can only end by timing out).
SHORT_TIMEOUT = 20

# Tolerance against the single process, as a fraction of each array's scale
# max(1, max|reference|). The two runs do the same arithmetic except for the order of
# float32 sums: a weight's gradient sums <= N = 9 per-example terms, in one reduction in
# the single process but as two per-worker partial sums added by the all-reduce in the
# cluster, and a reordered sum of N terms differs by at most (N - 1) * eps32 of the sum
# of their magnitudes (eps32 = 2**-23). The BN statistics are float64 merged in another
# order: at most an ulp of float32 after rounding. Each of the S = 5 steps adds such a
# difference to the weights, and later steps carry the earlier ones through the network
# (BN's 1 / std, the Dense kernels, all O(1) here); 16x covers that amplification.
# 16 * S * (N - 1) * eps32 = 7.6e-5. Observed: <= 1.2e-7 (an ulp or two); per-worker
# statistics (synchronized=False, shares without empty ones) put the weights 6e-3 to 0.2
# off, and the workers' moving statistics apart.
STEPS, N = len(mw.SHARES), max(sum(s) for s in mw.SHARES)
REL_TOL = 16 * STEPS * (N - 1) * 2.0 ** -23


def _tf_config(ports, index):
    return json.dumps({"cluster": {"worker": [f"localhost:{p}" for p in ports]},
                       "task": {"type": "worker", "index": index}})


def _env(**extra):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="",
               OMP_WAIT_POLICY="PASSIVE", NUMBA_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    env.pop("TF_CONFIG", None)
    env.pop("MW_DIE_AFTER_STEP", None)
    env.update(extra)
    return env


def _workers(tmp_path, extra_env=None):
    """Both workers' specs for `run_processes`; ``extra_env``: {index: {name: value}}."""
    ports = free_ports(2)
    extra_env = extra_env or {}
    return {f"worker {i}": (["multi", str(tmp_path / f"worker{i}.npz")],
                            _env(TF_CONFIG=_tf_config(ports, i), **extra_env.get(i, {})))
            for i in (0, 1)}


def _variables(npz):
    return {k: npz[k] for k in npz.files if k not in ("step_seconds", "examples")}


def test_two_workers_agree_bitwise_and_equal_one_process_on_the_whole_batch(tmp_path):
    specs = _workers(tmp_path)
    specs["single process"] = (["single", str(tmp_path / "single.npz")], _env())
    run_processes(WORKER, specs, tmp_path, TIMEOUT, WHAT)
    runs = [np.load(tmp_path / f"{n}.npz") for n in ("worker0", "worker1", "single")]

    # unequal shares, an empty one on each worker, adding up to the single batches
    examples = [list(r["examples"]) for r in runs]
    assert examples == [[s[0] for s in mw.SHARES], [s[1] for s in mw.SHARES],
                        [sum(s) for s in mw.SHARES]]
    assert 0 in examples[0] and 0 in examples[1]

    w0, w1, ref = (_variables(r) for r in runs)
    assert w0.keys() == w1.keys() == ref.keys()
    assert any("moving_mean" in k for k in ref) and any("moving_variance" in k for k in ref)
    for k in ref:
        assert w0[k].dtype == w1[k].dtype == ref[k].dtype == np.float32, k
        assert w0[k].tobytes() == w1[k].tobytes(), f"{k}: the workers differ"

    diffs = {k: float(np.max(np.abs(w0[k] - ref[k]))) for k in ref}
    for k, diff in diffs.items():
        assert diff <= REL_TOL * max(1.0, float(np.max(np.abs(ref[k])))), (k, diff)
    # training happened: the moving statistics left their initial values (0 and 1)
    mean = next(v for k, v in ref.items() if "moving_mean" in k)
    assert np.all(np.abs(mean) > 0.1)
    print("max |2 workers - 1 process|:", json.dumps(diffs))
    print("step seconds:", {n: np.round(r["step_seconds"], 3).tolist()
                            for n, r in zip(("worker 0", "worker 1", "single"), runs)})


def test_a_worker_that_dies_fails_the_run_at_once(tmp_path):
    """Worker 1 exits (status 3) after its second step: the run fails well before the
    deadline, both workers are gone, and the failure shows worker 1's last output."""
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as info:
        run_processes(WORKER, _workers(tmp_path, {1: {"MW_DIE_AFTER_STEP": "1"}}),
                      tmp_path, TIMEOUT, WHAT)
    elapsed = time.monotonic() - start
    message = str(info.value)
    assert "worker 1 exited with status 3" in message
    assert "dying on purpose" in message and "--- worker 0" in message
    assert elapsed < TIMEOUT / 2, elapsed


def test_a_missing_worker_fails_by_the_deadline(tmp_path):
    """Only worker 0 starts: it waits for worker 1 forever (in the strategy's constructor),
    and the harness kills it at the deadline."""
    start = time.monotonic()
    specs = _workers(tmp_path)
    del specs["worker 1"]
    with pytest.raises(WorkerFailure,
                       match=r"timed out after \d+ s: worker 0 still running") as info:
        run_processes(WORKER, specs, tmp_path, SHORT_TIMEOUT, WHAT)
    assert "worker 0: waiting for the cluster" in str(info.value)
    assert time.monotonic() - start < SHORT_TIMEOUT + 10
