"""Draw the performance history that asv recorded: one PNG, one point per commit.

Two panels for the headline shape (64, 56, 56, 64) float32: the Keras layer's speed-up
over ``keras.layers.BatchNormalization`` (training step and inference), and each
kernel's time over its memory-bandwidth floor (1.0 = at the floor), channels-last and
channels-first. Run after ``make bench-history``::

    python benchmarks/plot_history.py [--results .asv/results] [--out history.png]

Needs matplotlib (``pip install ".[bench]"``). Commits are ordered by commit date; a
commit that lacks a benchmark (older than it) has no point there.
"""

import argparse
import json
from pathlib import Path

# (panel, asv benchmark name, parameter value, label)
SERIES = [
    ("speed-up over stock Keras (x)", "bench_keras.KerasLayer.track_speedup_vs_stock_train",
     "'nhwc'", "train step"),
    ("speed-up over stock Keras (x)", "bench_keras.KerasLayer.track_speedup_vs_stock_inference",
     "'nhwc'", "inference"),
    ("time / bandwidth floor", "bench_kernels.BandwidthFloor.track_floor_ratio_train",
     "'nhwc'", "train NHWC"),
    ("time / bandwidth floor", "bench_kernels.BandwidthFloor.track_floor_ratio_train",
     "'nchw'", "train NCHW"),
    ("time / bandwidth floor", "bench_kernels.BandwidthFloor.track_floor_ratio_backward",
     "'nhwc'", "backward NHWC"),
    ("time / bandwidth floor", "bench_kernels.BandwidthFloor.track_floor_ratio_inference",
     "'nhwc'", "inference NHWC"),
]


def load(results_dir):
    """{commit: (date, {(benchmark, param): value})} from asv's result files."""
    commits = {}
    for path in Path(results_dir).glob("*/*.json"):
        if path.name == "machine.json":
            continue
        data = json.loads(path.read_text())
        if "commit_hash" not in data:
            continue
        date, values = commits.setdefault(data["commit_hash"][:8], (data.get("date", 0), {}))
        names = data.get("result_columns", ["result", "params"])
        for bench, row in data.get("results", {}).items():
            entry = dict(zip(names, row))
            result, params = entry.get("result"), entry.get("params") or [[]]
            if result is None:
                continue
            for param, value in zip(params[0] or [None], result):
                if value is not None:
                    values[(bench, param)] = value
    return commits


def plot(commits, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(commits, key=lambda c: commits[c][0])
    panels = list(dict.fromkeys(panel for panel, *_ in SERIES))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 3.2 * len(panels)), sharex=True)
    for ax, panel in zip(axes, panels):
        for _, bench, param, label in (s for s in SERIES if s[0] == panel):
            xs = [i for i, c in enumerate(order) if (bench, param) in commits[c][1]]
            ys = [commits[order[i]][1][(bench, param)] for i in xs]
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        if "floor" in panel:
            ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        else:
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
        ax.set_ylabel(panel)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(range(len(order)), order, rotation=45, fontsize=8)
    axes[-1].set_xlabel("commit (oldest left)")
    fig.suptitle("numbabn performance history, (64, 56, 56, 64) float32")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=".asv/results")
    parser.add_argument("--out", default="benchmarks/history.png")
    args = parser.parse_args(argv)
    commits = load(args.results)
    if not commits:
        raise SystemExit(f"no asv results under {args.results}: run `make bench-history` first")
    print(f"{len(commits)} commits -> {plot(commits, args.out)}")
    for commit in sorted(commits, key=lambda c: commits[c][0]):
        row = [f"{commits[commit][1].get((b, p), float('nan')):.2f}" for _, b, p, _ in SERIES]
        print(commit, " ".join(row))


if __name__ == "__main__":
    main()
