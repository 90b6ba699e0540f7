"""benchmarks/gate.py fails on peak memory and on gated figures gone missing, only on those
(kernel times: benchmarks/ab_gate.py, tests/test_benchmarks.py)."""

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


def test_gate_flags_more_memory_and_failures_not_times(tmp_path, capsys):
    base = _result_file(tmp_path / "base.json", 1.0, 4.0, 10.0, 2 ** 20)
    same = _result_file(tmp_path / "same.json", 1.2, 3.5, 25.0, 2 ** 20)
    assert gate.main([base, same]) == 0  # absolute ms 2.5x: noted, not gated
    assert "track_ms_train" in capsys.readouterr().out
    slower = _result_file(tmp_path / "slower.json", 2.1, 4.0, 10.0, 2 ** 20)
    assert gate.main([base, slower]) == 0  # a floor ratio 2.1x: reported, ab_gate's to gate
    assert "track_floor_ratio_1thread_inference ['nhwc']" in capsys.readouterr().out
    peer = _result_file(tmp_path / "peer.json", 1.0, 2.0, 10.0, 2 ** 20)
    assert gate.main([base, peer]) == 0  # a speed-up over a peer: reported, not gated
    assert "track_speedup_vs_tf_train" in capsys.readouterr().out
    more = _result_file(tmp_path / "more.json", 1.0, 4.0, 10.0, 2 ** 25)
    assert gate.main([base, more]) == 1  # peak memory 32x
    jitter = _result_file(tmp_path / "jitter.json", 1.0, 4.0, 10.0, 2 ** 21)
    assert gate.main([base, jitter]) == 0  # 1 -> 2 MiB: within PEAK_SLACK
    failed = _result_file(tmp_path / "failed.json", 1.0, 4.0, 10.0, None)
    assert gate.main([base, failed]) == 1  # a gated figure missing from head
    values = gate.load(".", base)
    assert values[("bench_torch.TorchKernels.track_time_over_torch_train",
                   "'b', 'numbabn'")] == 0.6
