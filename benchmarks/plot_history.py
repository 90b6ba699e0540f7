"""Draw the performance history that asv recorded: one PNG, one point per commit.

One panel per headline figure, from the whole-suite runs of ``make bench-history``:
numbabn's speed-up over stock Keras (the layer's training step and inference at (64,
56, 56, 64) float32; ResNet50's and MobileNetV2's training step), its speed-up over
TensorFlow's fused op (train, inference, backward at the same shape), each kernel's
time over its memory-bandwidth floor per layout (1.0 = at the floor), the peak memory
of an allocating call in units of its input's size, and the first call in a new process
with an empty kernel cache (import + compile + run). Every figure but the last is a
ratio of times taken in turns in one process, which holds on a loaded machine. Run
after ``make bench-history``::

    python benchmarks/plot_history.py [--results .asv/results] [--out history.png]

Needs matplotlib (``pip install ".[bench]"``). Commits are ordered by commit date; a
commit that lacks a benchmark (older than it) has no point there.

``--spread OTHER_RESULTS`` prints the noise instead: for the commits both result folders
hold (two runs of the same code), max/min of each headline figure between the runs, its
median and worst over those commits, and the median and 90th percentile over every
figure (no matplotlib needed).
"""

import argparse
import itertools
import json
import statistics
from pathlib import Path

SPEEDUP_STOCK = "speed-up over stock Keras (x)"
SPEEDUP_TF = "speed-up over TF's fused op (x)"
FLOOR = "time / bandwidth floor"
PEAK = "peak memory / input size"
FIRST = "first call in a new process (s)"
#: bytes of the (64, 56, 56, 64) float32 input, the unit of the peak-memory panel
NHWC_BYTES = 64 * 56 * 56 * 64 * 4

# (panel, asv benchmark name, parameter value, label[, scale])
SERIES = [
    (SPEEDUP_STOCK, "bench_keras.KerasLayer.track_speedup_vs_stock_train", "'nhwc'",
     "layer, train step"),
    (SPEEDUP_STOCK, "bench_keras.KerasLayer.track_speedup_vs_stock_inference", "'nhwc'",
     "layer, inference"),
    (SPEEDUP_STOCK, "bench_models.Models.track_speedup_vs_stock_train", "'resnet50'",
     "ResNet50 train step"),
    (SPEEDUP_STOCK, "bench_models.Models.track_speedup_vs_stock_train", "'mobilenetv2'",
     "MobileNetV2 train step"),
    (SPEEDUP_TF, "bench_kernels.Peers.track_speedup_vs_tf_train", "'nhwc'", "train"),
    (SPEEDUP_TF, "bench_kernels.Peers.track_speedup_vs_tf_inference", "'nhwc'",
     "inference"),
    (SPEEDUP_TF, "bench_kernels.Peers.track_speedup_vs_tf_backward", "'nhwc'", "backward"),
    (FLOOR, "bench_kernels.BandwidthFloor.track_floor_ratio_train", "'nhwc'", "train NHWC"),
    (FLOOR, "bench_kernels.BandwidthFloor.track_floor_ratio_train", "'nchw'", "train NCHW"),
    (FLOOR, "bench_kernels.BandwidthFloor.track_floor_ratio_train", "'nc'", "train (N, C)"),
    (FLOOR, "bench_kernels.BandwidthFloor.track_floor_ratio_backward", "'nhwc'",
     "backward NHWC"),
    (FLOOR, "bench_kernels.BandwidthFloor.track_floor_ratio_backward", "'nchw'",
     "backward NCHW"),
    (FLOOR, "bench_kernels.BandwidthFloor.track_floor_ratio_inference", "'nhwc'",
     "inference NHWC"),
    (PEAK, "bench_kernels.PeakMem.track_peak_increase_train", "'nhwc'", "train", NHWC_BYTES),
    (PEAK, "bench_kernels.PeakMem.track_peak_increase_backward", "'nhwc'", "backward",
     NHWC_BYTES),
    (PEAK, "bench_kernels.PeakMem.track_peak_increase_inference", "'nhwc'", "inference",
     NHWC_BYTES),
    (FIRST, "bench_kernels.FirstCall.track_first_call_cold", None, "empty kernel cache"),
    (FIRST, "bench_kernels.FirstCall.track_first_call_warm_cache", None,
     "warm kernel cache"),
]


def _series(s):
    panel, bench, param, label, *scale = s
    return panel, bench, param, label, (scale[0] if scale else 1.0)


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
            result, params = entry.get("result"), entry.get("params") or []
            if result is None:
                continue
            if not isinstance(result, list):
                result = [result]
            # one value per combination of the parameters (none: one value)
            combos = [", ".join(c) for c in itertools.product(*params)] if params else [None]
            for param, value in zip(combos, result):
                if value is not None:
                    values[(bench, param)] = value
    return commits


def plot(commits, out):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(commits, key=lambda c: commits[c][0])
    panels = list(dict.fromkeys(panel for panel, *_ in SERIES))
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.8 * len(panels)), sharex=True)
    for ax, panel in zip(axes, panels):
        for _, bench, param, label, scale in (_series(s) for s in SERIES if s[0] == panel):
            xs = [i for i, c in enumerate(order) if (bench, param) in commits[c][1]]
            ys = [commits[order[i]][1][(bench, param)] / scale for i in xs]
            if xs:
                ax.plot(xs, ys, marker="o", label=label)
        if panel != FIRST:
            ax.axhline(1.0, color="grey", lw=0.8, ls="--" if panel == FLOOR else ":")
        ax.set_ylabel(panel)
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1].set_xticks(range(len(order)), order, rotation=45, fontsize=8)
    axes[-1].set_xlabel("commit (oldest left)")
    fig.suptitle("numbabn performance history (whole asv suite, one point per commit)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def on_branch(commits, branch):
    """The commits of ``commits`` that ``branch`` contains (``git merge-base
    --is-ancestor``): ``make bench-gate`` also leaves results of HEAD and of throwaway
    branches in the results folder. All of them where git cannot tell (no repository)."""
    import subprocess

    kept = {}
    for c, v in commits.items():
        try:
            rc = subprocess.run(["git", "merge-base", "--is-ancestor", c, branch],
                                capture_output=True).returncode
        except OSError:
            return commits
        if rc == 128:  # not a repository, or an unknown commit: cannot tell
            return commits
        if rc == 0:
            kept[c] = v
    return kept


def spread(first, second):
    """Lines describing how far the figures of the commits in both ``load`` results
    moved between the two runs (max/min per commit and figure)."""
    common = sorted(set(first) & set(second), key=lambda c: first[c][0])
    if not common:
        return ["no commit has results in both"]

    def ratios(keys):
        out = []
        for commit in common:
            a, b = first[commit][1], second[commit][1]
            for key in keys(a, b):
                x, y = a.get(key), b.get(key)
                if isinstance(x, (int, float)) and isinstance(y, (int, float)) and x > 0 < y:
                    out.append(max(x, y) / min(x, y))
        return sorted(out)

    lines = [f"{len(common)} commits in both runs: {' '.join(common)}",
             "figure: max/min between the runs, median and worst over those commits"]
    for panel, bench, param, label, _ in map(_series, SERIES):
        r = ratios(lambda a, b: [(bench, param)])
        if r:
            lines.append(f"  {panel} | {label}: {statistics.median(r):.2f}x, {r[-1]:.2f}x")
    every = ratios(lambda a, b: set(a) & set(b))
    lines.append(f"all {len(every)} figure pairs: median {statistics.median(every):.2f}x, "
                 f"90th percentile {every[int(0.9 * (len(every) - 1))]:.2f}x")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=".asv/results")
    parser.add_argument("--out", default="benchmarks/history.png")
    parser.add_argument("--branch", default="main",
                        help="plot only commits this branch contains ('' for all)")
    parser.add_argument("--spread", metavar="OTHER_RESULTS",
                        help="print how far each figure moved against another run's "
                             "results of the same commits, instead of plotting")
    args = parser.parse_args(argv)
    commits = load(args.results)
    if args.spread:
        print("\n".join(spread(commits, load(args.spread))))
        return
    if args.branch:
        commits = on_branch(commits, args.branch)
    if not commits:
        raise SystemExit(f"no asv results under {args.results}: run `make bench-history` first")
    print(f"{len(commits)} commits -> {plot(commits, args.out)}")
    for commit in sorted(commits, key=lambda c: commits[c][0]):
        row = [f"{commits[commit][1].get((b, p), float('nan')) / k:.2f}"
               for _, b, p, _, k in map(_series, SERIES)]
        print(commit, " ".join(row))


if __name__ == "__main__":
    main()
