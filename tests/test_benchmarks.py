"""The asv suite never rots: every benchmark imports and runs once at a small size."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
#: bench_torch's classes skip where PyTorch is not installed (it is an optional extra)
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def test_every_benchmark_runs_once_on_small_inputs():
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "bench_smoke_worker.py")],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    ran = report["ran"]
    for suite in ("bench_kernels", "bench_keras", "bench_models", "bench_cuda",
                  "bench_torch"):
        assert any(name.startswith(suite) for name in report["classes"]), suite
    # every CPU class ran (the GPU ones need a GPU; the PyTorch ones, PyTorch)
    for cls in report["classes"]:
        if not cls.startswith("bench_cuda") and (HAVE_TORCH or
                                                 not cls.startswith("bench_torch")):
            assert any(name.startswith(cls + ".") for name in ran), cls
    assert len(ran) >= 200
    # only the GPU suite may decline, for want of a GPU, and the PyTorch suite, for want
    # of PyTorch
    for name, why in report["declined"].items():
        if name.startswith("bench_torch"):
            assert not HAVE_TORCH and "torch" in why, (name, why)
            continue
        assert name.startswith("bench_cuda"), (name, why)
        assert "GPU" in why or "CUDA" in why, why


def test_asv_check_finds_no_problems():
    proc = subprocess.run([sys.executable, "-m", "asv", "check", "--python=same"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, ASV_PYTHONPATH=str(ROOT),
                                   NUMBABN_BENCH_SMALL="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No problems found" in proc.stdout + proc.stderr


def test_overhead_report_checks_and_prints(capsys):
    from benchmarks import overhead_report

    overhead_report.main(["--repeat", "1"])
    out = capsys.readouterr().out
    assert out.count("| (64, 256) |") == 3 and "speed-up" in out
