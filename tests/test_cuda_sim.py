"""The GPU test suite (tests/cuda/) under the CUDA simulator, and CUDA as an option.

NUMBA_ENABLE_CUDASIM must be set before Numba is imported, and this process has
imported it already, so the simulator suite runs in a subprocess. It must run every
test but the hardware-only ones: a run that skipped them all would pass otherwise.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
#: A floor on the simulator suite's size, in case collection itself goes wrong.
MIN_SIMULATED_TESTS = 150


def _pytest_under_simulator(*args):
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "tests/cuda", "-p",
                           "no:cacheprovider", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _counts(summary):
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", summary)}


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason="numba-cuda is not installed (pip install '.[cuda]')")
def test_gpu_suite_passes_under_the_simulator():
    collected = _pytest_under_simulator("--collect-only", "-q", "-m", "not gpu_hardware")
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    found = re.search(r"(\d+)/(\d+) tests collected", collected.stdout)
    assert found, collected.stdout[-2000:]
    expected, hardware_only = int(found.group(1)), int(found.group(2)) - int(found.group(1))
    assert expected >= MIN_SIMULATED_TESTS and hardware_only > 0

    run = _pytest_under_simulator("-q", "-rs")
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-6000:]
    counts = _counts(output.strip().splitlines()[-1])
    assert counts.get("passed") == expected, output[-3000:]
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    skips = re.findall(r"^SKIPPED \[(\d+)\] (\S+?\.py)(?::\d+)?: (.*)$", output, flags=re.M)
    for _, where, reason in skips:  # only the hardware tests may skip, and say why
        assert "test_cuda_hardware.py" in where and "needs a real CUDA GPU" in reason, skips
    assert sum(int(n) for n, _, _ in skips) == hardware_only == counts.get("skipped")


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason="numba-cuda is not installed (pip install '.[cuda]')")
def test_cuda_report_runs_under_the_simulator():
    """benchmarks/cuda_report.py --tiny: checks every kernel, then prints its table
    (float32, and bfloat16, which the report handles through int16 views; float16 is
    left out only to save a simulated minute)."""
    pytest.importorskip("ml_dtypes")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "benchmarks/cuda_report.py", "--tiny", "--dtypes",
                           "float32", "bfloat16"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| case | op | numbabn ms |" in proc.stdout
    assert proc.stdout.count("| train |") == 4 and proc.stdout.count("| backward |") == 4
    assert proc.stdout.count("bfloat16 | train |") == 2


_WITHOUT_NUMBA_CUDA = """
import sys
sys.modules["numba_cuda"] = None  # as if numba-cuda were not installed
import io, numpy as np, numbabn as nbn
y, stats = nbn.batch_norm_train(np.arange(12.0).reshape(4, 3))
assert abs(float(stats.mean[1]) - 5.5) < 1e-12
buf = io.StringIO(); nbn.show_config(file=buf); print(buf.getvalue())
from numbabn import _device
print("simulated:", _device.simulated())  # Numba's own numba.cuda has no .core

class ForeignGPUArray:  # what CuPy or PyTorch hand over
    __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False),
                                "version": 3, "strides": None}

try:
    nbn.batch_norm_train(ForeignGPUArray())
except RuntimeError as exc:
    print("RuntimeError:", exc)
"""


def test_cpu_path_needs_no_numba_cuda():
    """numbabn imports and runs on the CPU without numba-cuda; GPU input says what's missing."""
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_NUMBA_CUDA], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert "CUDA: not available (numba-cuda is not installed" in proc.stdout
    assert "simulated: False" in proc.stdout
    assert "RuntimeError: numbabn was given a GPU array, but numba-cuda is not installed" \
        in proc.stdout


def test_cpu_calls_do_not_import_numba_cuda():
    code = ("import sys, numpy as np, numbabn as nbn\n"
            "y, s = nbn.batch_norm_train(np.ones((8, 3)))\n"
            "nbn.batch_norm_backward(y, np.ones((8, 3)), None, s)\n"
            "print('numba.cuda' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_gpu_array_without_a_usable_gpu_is_a_clear_error():
    """A GPU array (here a stand-in) on a machine where CUDA cannot run: RuntimeError."""
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed (test_cpu_path_needs_no_numba_cuda)")
    from numba import cuda

    import numbabn as nbn

    if cuda.is_available():
        pytest.skip("this machine has a usable GPU")

    class ForeignGPUArray:
        __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False),
                                    "version": 3, "strides": None}

    with pytest.raises(RuntimeError, match="CUDA is not usable here"):
        nbn.batch_norm_train(ForeignGPUArray())
