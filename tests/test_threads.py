"""Determinism across thread counts and safety under concurrent calls, in subprocesses."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent


def run_worker(mode, **env):
    full_env = dict(os.environ, **env)
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE.parent), full_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, str(HERE / "workers.py"), mode], env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("mode, n_lines", [("hashes", 5), ("hashes-half", None)])
def test_bitwise_identical_with_1_and_2_threads(mode, n_lines):
    """float32, and the half formats (float16; bfloat16 with ml_dtypes)."""
    runs = {n: run_worker(mode, NUMBA_NUM_THREADS=str(n)) for n in (1, 2)}
    for n, proc in runs.items():
        assert proc.returncode == 0, proc.stderr
        assert f"threads {n}" in proc.stdout
    lines = {n: proc.stdout.splitlines()[:-1] for n, proc in runs.items()}
    assert len(lines[1]) == (n_lines or 5 * len({line.split()[0] for line in lines[1]}))
    assert len(lines[1]) >= 5
    assert lines[1] == lines[2]


def _tbb_env():
    """tbb from pip puts libtbb in <prefix>/lib, which the loader only finds when told."""
    lib = Path(sys.prefix) / "lib"
    return {"LD_LIBRARY_PATH": os.pathsep.join([str(lib), os.environ.get("LD_LIBRARY_PATH", "")])}


def _loadable(layer, env):
    probe = ("import numba, numpy as np\n"
             "f = numba.njit(parallel=True)(lambda a: a + 1)\n"
             "f(np.ones(10)); print(numba.threading_layer())")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=dict(os.environ, NUMBA_THREADING_LAYER=layer, **env), timeout=120)
    return proc.returncode == 0 and proc.stdout.strip() == layer


@pytest.mark.parametrize("layer", ["workqueue", "omp", "tbb"])
def test_concurrent_calls_are_safe(layer):
    """4 Python threads at once: same bits as serial calls, and the interpreter survives.

    Under workqueue (which aborts on concurrent entry) numbabn serializes its kernels.
    """
    env = _tbb_env() if layer == "tbb" else {}
    if not _loadable(layer, env):
        pytest.skip(f"the {layer} threading layer cannot be loaded on this machine")
    proc = run_worker("concurrent", NUMBA_THREADING_LAYER=layer, NUMBA_NUM_THREADS="2", **env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"layer {layer}" in proc.stdout
    if layer == "workqueue":
        assert "runs one kernel at a time" in proc.stderr  # the user is told, once
        assert proc.stderr.count("runs one kernel at a time") == 1
