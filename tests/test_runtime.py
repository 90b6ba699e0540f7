"""Import stays light; show_config tells the user how numbabn runs."""

import io
import subprocess
import sys

import numbabn as nbn


def test_import_compiles_nothing():
    code = ("import numbabn, numbabn._kernels_cpu as k\n"
            "from numba.core.registry import CPUDispatcher\n"
            "kernels = [v for v in vars(k).values() if isinstance(v, CPUDispatcher)]\n"
            "assert len(kernels) >= 8, kernels\n"
            "print(sum(len(v.overloads) for v in kernels))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


def test_show_config_reports_layer_threads_cache_cuda():
    nbn.batch_norm_train([[0.0, 1.0], [2.0, 3.0]])  # the threading layer starts here
    buf = io.StringIO()
    nbn.show_config(file=buf)
    text = buf.getvalue()
    for fragment in ("numbabn 0.1.0", "threading layer: ", "threads: ", "kernel cache: ",
                     "CUDA: "):
        assert fragment in text
    assert "not started yet" not in text
