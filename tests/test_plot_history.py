"""benchmarks/plot_history.py reads asv's result files and draws the history."""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import plot_history  # noqa: E402


def _result_file(directory, commit, date, speedup, ratio):
    data = {
        "commit_hash": commit * 5, "date": date, "version": 2,
        "result_columns": ["result", "params"],
        "results": {
            "bench_keras.KerasLayer.track_speedup_vs_stock_train": [[speedup, 0.5],
                                                                     [["'nhwc'", "'small'"]]],
            "bench_kernels.BandwidthFloor.track_floor_ratio_train": [[ratio, ratio + 0.1],
                                                                      [["'nhwc'", "'nchw'"]]],
        },
    }
    (directory / f"{commit * 5}-env.json").write_text(json.dumps(data))


def test_history_png_from_asv_results(tmp_path):
    machine = tmp_path / "results" / "machine-a"
    machine.mkdir(parents=True)
    (machine / "machine.json").write_text("{}")
    _result_file(machine, "bbbbbbbb", 2, 4.5, 1.2)
    _result_file(machine, "aaaaaaaa", 1, 4.0, 1.3)
    commits = plot_history.load(tmp_path / "results")
    assert list(sorted(commits, key=lambda c: commits[c][0])) == ["aaaaaaaa", "bbbbbbbb"]
    values = commits["bbbbbbbb"][1]
    assert values[("bench_keras.KerasLayer.track_speedup_vs_stock_train", "'nhwc'")] == 4.5
    assert values[("bench_kernels.BandwidthFloor.track_floor_ratio_train", "'nchw'")] == 1.3
    out = tmp_path / "history.png"
    plot_history.main(["--results", str(tmp_path / "results"), "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_spread_between_two_runs_of_the_same_commits(tmp_path, capsys):
    for run, speedup in (("one", 4.0), ("two", 5.0)):
        machine = tmp_path / run / "machine-a"
        machine.mkdir(parents=True)
        (machine / "machine.json").write_text("{}")
        _result_file(machine, "aaaaaaaa", 1, speedup, 1.2)
    _result_file(tmp_path / "two" / "machine-a", "bbbbbbbb", 2, 9.0, 1.0)  # one run only
    plot_history.main(["--results", str(tmp_path / "one"), "--spread", str(tmp_path / "two")])
    out = capsys.readouterr().out
    assert "1 commits in both runs: aaaaaaaa" in out
    assert "layer, train step: 1.25x, 1.25x" in out  # 5.0 / 4.0
    assert "train NHWC: 1.00x, 1.00x" in out
    assert "all 4 figure pairs: median 1.00x" in out
