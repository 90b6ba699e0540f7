"""The asv suite never rots: every benchmark imports and runs once at a small size."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numba
import pytest

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


def test_peer_tolerance_comes_from_float32_accumulation():
    import numpy as np
    import pytest

    sys.path.insert(0, str(ROOT))
    from benchmarks import _common

    # (64, 56, 56, 64): 200,704 elements per channel; the Xeon's TF dgamma, 1.48e-3 off,
    # is within float32 accumulation's bound, and an O(1) error is far outside it
    tol = _common.peer_tolerance(np.float32, 64 * 56 * 56)
    assert 1.48e-3 < tol < 0.02
    assert _common.peer_tolerance(np.float32, 10) == _common.TOLERANCE[np.dtype(np.float32)]
    assert _common.peer_tolerance(np.float16, 10) == _common.TOLERANCE[np.dtype(np.float16)]

    from benchmarks._numpy_bn import numpy_ops

    inp, ref = _common.checked_inputs(*_common.CASES["small"])
    good = numpy_ops(inp, _common.EPS)

    def wrong_backward():
        dx, dgamma, dbeta = good["backward"]()
        return dx, dgamma * 1.1, dbeta

    _common.check_peer("numpy", good, ref)
    with pytest.raises(AssertionError, match="backward dgamma"):
        _common.check_peer("broken", {**good, "backward": wrong_backward}, ref)


def test_a_peer_that_fails_its_check_drops_only_its_own_benchmarks():
    import pytest

    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_kernels import Peers

    ms = {op: {"numbabn": 1.0, "numpy": 3.0} for op in ("train", "inference", "backward")}
    results = {"peers": {"small": {"failed": {"tf_fused": "failed its check against "
                                                          "float64: (simulated)"},
                                   "ms": ms}}}
    bench = Peers()
    bench.setup(results, "small")
    for name in ("train", "inference", "backward"):
        assert getattr(bench, f"track_ms_numbabn_{name}")(results, "small") == 1.0
        assert getattr(bench, f"track_ms_numpy_{name}")(results, "small") == 3.0
        with pytest.raises(RuntimeError, match="tf_fused is not timed: failed its check"):
            getattr(bench, f"track_ms_tf_fused_{name}")(results, "small")
    assert bench.track_speedup_vs_numpy_train(results, "small") == 3.0
    with pytest.raises(RuntimeError, match="simulated"):
        bench.track_speedup_vs_tf_backward(results, "small")


def test_measure_peers_runs_each_peer_in_turns_on_small_inputs():
    """`Peers`' setup_cache on the small case alone: every peer checked and timed."""
    sys.path.insert(0, str(ROOT))
    from benchmarks import bench_kernels

    saved = bench_kernels.PEER_CASES
    bench_kernels.PEER_CASES = ["small"]
    try:
        results = bench_kernels.measure_peers()
    finally:
        bench_kernels.PEER_CASES = saved
    assert set(results) == {"small"}
    assert not results["small"]["failed"], results["small"]["failed"]
    for op in ("train", "inference", "backward"):
        assert set(results["small"]["ms"][op]) == {"numbabn", "tf_fused", "numpy"}
        assert all(v > 0 for v in results["small"]["ms"][op].values())


def test_peak_increase_counts_what_a_call_allocates():
    import numpy as np
    import pytest

    sys.path.insert(0, str(ROOT))
    from benchmarks._common import peak_increase

    try:
        got = peak_increase(lambda: np.ones(4_000_000))  # 32 MB, kept until the peak
    except NotImplementedError:
        pytest.skip("no /proc/self/clear_refs here")
    assert 32e6 <= got < 40e6
    assert peak_increase(lambda: None) < 4e6


def test_conv_bn_report_checks_every_variant_against_stock():
    from benchmarks import conv_bn_report

    for use_bias in (False, True):
        ms = conv_bn_report.measure(conv_bn_report.build((2, 4, 4, 8), use_bias), rounds=1,
                                    calls=1)
        assert set(ms) == set(conv_bn_report.VARIANTS) and all(v > 0 for v in ms.values())



def test_summarize_rounds_pairs_stock_and_numbabn_round_by_round():
    from benchmarks._model_common import paired_text, summarize_rounds

    # a slow second round hits both variants: the medians' ratio hides what the pairs show
    samples = {("stock", "train"): [1.0, 3.0, 1.2], ("numbabn", "train"): [0.8, 2.5, 1.3],
               ("no_bn", "train"): [0.5, 1.5, 0.6]}
    median = {k: sorted(v)[1] for k, v in samples.items()}
    got = summarize_rounds(median, samples, ["stock", "numbabn", "no_bn"], ["train"])
    assert got["ms"]["train"] == {"stock": 1200.0, "numbabn": 1300.0, "no_bn": 600.0}
    assert got["spread"]["train"]["stock"] == pytest.approx(2.0 / 1.2)
    paired = got["paired"]["train"]
    assert paired["median"] == pytest.approx(1.2)  # 1.25, 1.2, 0.923
    assert (paired["low"], paired["high"]) == (pytest.approx(1.2 / 1.3), pytest.approx(1.25))
    assert (paired["wins"], paired["rounds"]) == (2, 3)
    assert paired_text(paired) == "1.20 (0.92-1.25), 2/3"
    # without both variants timed, nothing to pair
    assert summarize_rounds(median, samples, ["stock", "no_bn"], ["train"])["paired"] == {}


@pytest.mark.skipif(not HAVE_TORCH, reason="numbabn.torch is an optional extra")
def test_bn_step_ms_counts_each_bn_layer_once_and_nothing_else():
    import types

    import torch

    import numbabn.torch as nbt
    from benchmarks._torch_common import _bn_event_us, _is_bn_event, bn_step_ms

    names = ["aten::batch_norm", "NativeBatchNormBackward0", "numbabn_native::batch_norm",
             "autograd::engine::evaluate_function: NativeBatchNormBackward0",
             "torch::autograd::CppNode<(anonymous namespace)::NumbabnTrainFunction>",
             "_Train", "_InferenceBackward", "numbabn::batch_norm_train"]
    assert all(_is_bn_event(n) for n in names)
    assert not any(_is_bn_event(n) for n in ["aten::native_batch_norm", "aten::conv2d",
                                             "aten::add_", "AddBackward0", "_Trainer"])

    def event(name, us, parent=None):
        return types.SimpleNamespace(name=name, cpu_time_total=us, cpu_parent=parent)

    step = event("ProfilerStep", 1000)
    fwd = event("aten::batch_norm", 100, step)
    bwd = event("autograd::engine::evaluate_function: _TrainBackward", 30)
    events = [step, fwd, event("aten::native_batch_norm", 90, fwd),
              event("numbabn_native::batch_norm", 40, event("aten::relu", 5, fwd)), bwd,
              event("_TrainBackward", 25, bwd), event("aten::conv2d", 500, step)]
    assert _bn_event_us(events) == 100 + 30  # nested ones are in their parent's time

    x = torch.randn(8, 4, 16, 16, requires_grad=True)
    for bn in (torch.nn.BatchNorm2d(4), nbt.BatchNorm2d(4)):
        assert bn_step_ms(lambda bn=bn: bn(x).sum().backward(), steps=3, rounds=1) > 0
    conv = torch.ones(4, 4, 1, 1)
    assert bn_step_ms(lambda: torch.nn.functional.conv2d(x, conv).sum().backward(),
                      steps=3, rounds=1) == 0


def test_best_of_interleaved_counts_repeat_runs_of_each_function():
    from benchmarks._common import best_of_interleaved

    calls = {"slow": 0, "fast": 0}

    def slow():  # slower than min_seconds: its sizing call is a whole run
        calls["slow"] += 1
        time.sleep(0.002)

    def fast():
        calls["fast"] += 1

    t = best_of_interleaved({"slow": slow, "fast": fast}, repeat=3, min_seconds=0.001)
    assert calls["slow"] == 1 + 3  # warm-up, then 3 runs (the sizing call the first)
    assert calls["fast"] > 2 + 3
    assert t["slow"] >= 0.002 and 0 < t["fast"] < t["slow"]
    calls["slow"] = 0
    best_of_interleaved({"slow": slow}, repeat=3, min_seconds=0.001, warm=True)
    assert calls["slow"] == 3


def test_asv_commits_shares_one_extraction_between_commits_with_the_same_code(tmp_path):
    """Commits with the same numbabn/ and keras_layer/ run from one extracted copy (one
    Numba cache); a copy no later commit needs is removed."""
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    commits = []
    for i, (code, readme) in enumerate([("a", "1"), ("a", "2"), ("b", "2"), ("a", "3")]):
        for folder in ("numbabn", "keras_layer"):
            (repo / folder).mkdir(exist_ok=True)
            (repo / folder / "x.py").write_text(code)
        (repo / "README").write_text(readme)
        subprocess.run(git + ["add", "-A"], check=True)
        subprocess.run(git + ["commit", "-q", "-m", str(i)], check=True)
        commits.append(subprocess.run(git + ["rev-parse", "HEAD"], check=True,
                                      capture_output=True, text=True).stdout.strip())
    fake_asv = tmp_path / "asv"
    log = tmp_path / "log"
    # records the folder each run imports, what is in it, and the extracted copies
    fake_asv.write_text(f'#!/bin/sh\necho "$ASV_PYTHONPATH $(cat "$ASV_PYTHONPATH/numbabn/x.py")'
                        f' $(ls "$(dirname "$ASV_PYTHONPATH")" | wc -l)" >> {log}\n')
    fake_asv.chmod(0o755)
    proc = subprocess.run(["sh", str(ROOT / "benchmarks" / "asv_commits.sh"), *commits],
                          cwd=repo, capture_output=True, text=True,
                          env=dict(os.environ, ASV=str(fake_asv), TMPDIR=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    runs = [line.split() for line in log.read_text().splitlines()]
    assert [r[1] for r in runs] == ["a", "a", "b", "a"]
    assert runs[0][0] == runs[1][0] == runs[3][0] != runs[2][0]
    assert [int(r[2]) for r in runs] == [1, 1, 2, 1]  # b's copy gone once b has run
    assert proc.stdout.count("same numbabn/ and keras_layer/") == 2
    assert not any(p.name.startswith("numbabn-asv-") for p in tmp_path.iterdir())


def _ab_gate():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import ab_gate
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return ab_gate


def test_ab_gate_times_two_numbabns_in_turns_on_the_same_arrays_and_fails_a_slower_head(
        tmp_path):
    """This numbabn loaded twice side by side (from a copy: its own kernel cache), the
    second's inference made ~8x slower: only its inference timings fail. (The factor is
    4, not the gate's default 1.5: these calls take 10-80 us, and one noisy best-of-3 on
    a busy 2-core machine read 2.28x for an unchanged train in a fresh clone's run.)"""
    ab_gate = _ab_gate()
    shutil.copytree(ROOT / "numbabn", tmp_path / "numbabn",
                    ignore=shutil.ignore_patterns("__pycache__"))
    base, head = (ab_gate.load(name, tmp_path) for name in ("numbabn_t_base", "numbabn_t_head"))
    assert base.batch_norm_train is not head.batch_norm_train
    seen, real = [], head.batch_norm_inference

    def slow(x, *args, **kwargs):
        seen.append(x)
        for _ in range(7):
            real(x, *args, **kwargs)
        return real(x, *args, **kwargs)

    head.batch_norm_inference = slow
    results = ab_gate.measure([base, head], ["small"], 3)
    assert set(results) == {("small", op, n) for op in ab_gate.OPS
                            for n in sorted({1, numba.get_num_threads()})}
    assert len({id(x) for x in seen}) == 1  # one input array for all
    text, failed = ab_gate.report(results, 4.0, "a" * 40, "b" * 40, 3)
    assert failed, text
    failing = [line for line in text.split("FAIL")[1].splitlines()[1:]]
    assert failing and all(" inference " in line for line in failing), text
    # peak memory: the same calls take the same memory; a 26 MB temporary more fails
    peaks = ab_gate.measure_peaks([base, head], ["small"])
    assert set(peaks) == {("small", op) for op in ab_gate.OPS}
    assert all(b == h for b, h in peaks.values()), peaks
    # a package that imports numbabn by name would run this process's other numbabn
    (tmp_path / "numbabn" / "_absolute.py").write_text("from numbabn import config\n")
    with pytest.raises(ValueError, match="imports numbabn by name"):
        ab_gate.load("numbabn_t_refused", tmp_path)
    big = {("nhwc", "train"): (52 << 20, 52 << 20), ("nhwc", "stats"): (0, 26 << 20),
           ("nc", "stats"): (2 << 20, 3 << 20)}
    text, failed = ab_gate.report({}, 1.5, "a" * 40, "b" * 40, 3, big)
    assert failed and "1 of 3 figures" in text and "       nc     stats" not in text.split("FAIL")[1]


def test_ab_gate_runs_the_kernels_of_two_commits(tmp_path):
    # HEAD against itself on the small case, from git, as make bench-gate runs it
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ab_gate.py"), "HEAD",
                           "HEAD", "--cases", "small", "--rounds", "2", "--factor", "1000",
                           "--code", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK: none of" in proc.stdout
    assert sum(" small " in line and " ms " in line
               for line in proc.stdout.splitlines()) >= 4, proc.stdout
