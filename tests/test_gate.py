"""benchmarks/gate.py fails on the figures HEAD did not produce, and only on those (kernel
times and memory: benchmarks/ab_gate.py, tests/test_benchmarks.py)."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gate  # noqa: E402


def _result_file(path, floor_nhwc, speedup, ms, peak_small=None):
    data = {
        "commit_hash": "a" * 40, "date": 1, "version": 2,
        "result_columns": ["result", "params"],
        "results": {
            "bench_kernels.BandwidthFloor.track_floor_ratio_1thread_inference": [
                [floor_nhwc, 1.1], [["'nhwc'", "'nchw'"]]],
            "bench_kernels.Peers.track_speedup_vs_tf_train": [[speedup], [["'nhwc'"]]],
            "bench_kernels.Kernels.track_ms_train": [[ms], [["'nhwc'"]]],
            "bench_torch.TorchKernels.track_time_over_torch_train": [
                [0.5, 1.0, 0.6, 1.0], [["'a'", "'b'"], ["'numbabn'", "'torch'"]]],
            "bench_kernels.PeakMem.track_peak_increase_train": [[peak_small], [["'small'"]]],
        },
    }
    path.write_text(json.dumps(data))
    return str(path)


def test_gate_fails_on_failed_benchmarks_only_and_lists_what_moved(tmp_path, capsys):
    base = _result_file(tmp_path / "base.json", 1.0, 4.0, 10.0, 2 ** 20)
    same = _result_file(tmp_path / "same.json", 1.2, 3.5, 25.0, 2 ** 20)
    assert gate.main([base, same]) == 0  # absolute ms 2.5x: noted, not gated
    assert "track_ms_train" in capsys.readouterr().out
    slower = _result_file(tmp_path / "slower.json", 2.1, 4.0, 10.0, 2 ** 25)
    assert gate.main([base, slower]) == 0  # ab_gate.py gates kernel times and memory
    out = capsys.readouterr().out
    assert "track_floor_ratio_1thread_inference ['nhwc']" in out
    assert "track_peak_increase_train ['small']" in out
    failed = _result_file(tmp_path / "failed.json", 1.0, 4.0, 10.0, None)
    assert gate.main([base, failed]) == 1  # a figure missing from head
    assert "track_peak_increase_train ['small']: 1.049e+06 -> -" in capsys.readouterr().out
    # no stored results for base: HEAD's own failures still fail it
    assert gate.main([str(tmp_path / "none"), same]) == 0
    assert "No stored asv results" in capsys.readouterr().out
    assert gate.main([str(tmp_path / "none"), failed]) == 1
    assert gate.main([base, str(tmp_path / "none")]) == 2
    values = gate.load(".", base)
    assert values[("bench_torch.TorchKernels.track_time_over_torch_train",
                   "'b', 'numbabn'")] == 0.6
