"""The performance gate's first step: two commits' asv results, peak memory gated.

``make bench-gate`` runs the whole suite on main and on HEAD, then this::

    python benchmarks/gate.py BASE HEAD [--factor 1.5] [--results .asv/results]

(BASE and HEAD: revisions, or asv result files.)

Why not ``asv compare``/``asv continuous`` on every figure: on the shared 2-core machine
the absolute times of unchanged code moved by 20-80 % between runs (``main`` against
``main`` flagged 28 of ~330 figures at a factor of 1.5). Ratios of two times taken in
turns in one process moved less, but not all little enough: between two whole-suite
runs of the same code under load ~3.3, numbabn's speed-ups over the peers moved by up to
2.6x (a NumPy or TensorFlow call responds to the load its own way) and the two-thread
floor ratios by up to 1.7x (a parallel kernel needs both cores at once; a copy, one).
So this step fails only on `GATED`, the peak memory of every allocating call
(deterministic), and on a gated figure that base has and head does not (a benchmark
that failed: a kernel that fails its float64 check fails every figure of its
``setup_cache``, peak memory included). Kernel times are gated by the next step,
``ab_gate.py``, which times the two commits' kernels against each other in turns in one
process, on the same arrays: a kernel doing twice its work read 1.94-2.20x there, and
unchanged code moved by at most 1.24x, where the figures of two whole-suite runs (each
kernel on one thread over NumPy's copy of the same bytes, timed in the same turns,
`BandwidthFloor`, this step's gate until 2026-12-01) read 1.59-2.32x for the same
slowdown and moved by up to 1.48x unchanged. Every other figure is listed when it moved
beyond ``--factor``, for information only: the floor ratios, the speed-ups over peers and
stock layers, the models, absolute times. A figure is worse by ``head / base`` where
lower is better (``base / head`` where higher is, for figures added to `GATED`).

Exit status 1 when a gated figure is worse; 2 when a commit has no results.
"""

import argparse
import itertools
import json
import math
import re
import subprocess
import sys
from pathlib import Path

#: (regex on "module.Class.method", True if higher is better, regex on the parameters
#: of the figures left out)
GATED = [
    (r"\.PeakMem\.track_peak_increase_", False, None),
]


#: peak memory moved by less than this is not a change (`PeakMem` rounds to whole MiB; a
#: statistics pass read 2 MiB in one run and 3 MiB in the next); a new full-size
#: temporary of the smallest large case is 26 MB
PEAK_SLACK = 8 * 2 ** 20


def direction(name, params=""):
    """True (higher is better) / False (lower is better) for a gated figure, else None."""
    for pattern, higher, skip in GATED:
        if re.search(pattern, name) and not (skip and re.search(skip, params)):
            return higher
    return None


def load(results_dir, commit):
    """``{(benchmark, params): value}`` from an asv result file (``commit`` a path to
    one: ``make bench-gate`` keeps main's as .asv/gate-base.json) or from the result
    files of ``commit`` (a revision; the newest last when there are several)."""
    values, found = {}, False
    if Path(commit).is_file():
        files = [Path(commit)]
    else:
        commit = subprocess.run(["git", "rev-parse", "--verify", commit + "^{commit}"],
                                capture_output=True, text=True).stdout.strip() or commit
        files = sorted(Path(results_dir).glob(f"*/{commit[:8]}-*.json"),
                       key=lambda p: p.stat().st_mtime)
    for path in files:
        data = json.loads(path.read_text())
        if "results" not in data:
            continue
        found = True
        columns = data.get("result_columns", ["result", "params"])
        for bench, row in data.get("results", {}).items():
            entry = dict(zip(columns, row))
            result, params = entry.get("result"), entry.get("params") or []
            if not params:
                values[(bench, "")] = result[0] if isinstance(result, list) else result
                continue
            combos = list(itertools.product(*params))
            if not isinstance(result, list):
                result = [result] * len(combos)
            for combo, value in zip(combos, result):
                values[(bench, ", ".join(combo))] = value
    if not found:
        raise SystemExit(2)
    return values


def is_number(v):
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def compare(base, head, factor):
    """``(failures, notes)``: rows ``(name, params, base, head, worse-by)``."""
    failures, notes = [], []
    for key in sorted(set(base) | set(head)):
        b, h = base.get(key), head.get(key)
        higher = direction(*key)
        if not is_number(b):
            continue  # nothing to compare against (new, or failed on base too)
        if not is_number(h):
            if higher is not None:
                failures.append((*key, b, h, float("inf")))
            continue
        if b == h:
            worse = 1.0
        elif higher:
            worse = b / h if h > 0 else float("inf")
        elif higher is False:
            worse = h / b if b > 0 else (1.0 if h <= 0 else float("inf"))
        else:  # not gated: absolute figures; report a move either way
            worse = max(h / b, b / h) if b > 0 and h > 0 else 1.0
        if higher is not None and ".PeakMem." in key[0] and abs(h - b) < PEAK_SLACK:
            worse = 1.0  # a few pages more or less on a small figure (2 -> 3 MiB)
        if worse > factor:
            (failures if higher is not None else notes).append((*key, b, h, worse))
    return failures, notes


def table(rows):
    return "\n".join(f"  {name} [{params}]: {b:.4g} -> {h if h is None else format(h, '.4g')}"
                     f"  ({worse:.2f}x)" for name, params, b, h, worse in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("head")
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--results", default=".asv/results")
    args = parser.parse_args(argv)
    try:
        base = load(args.results, args.base)
        head = load(args.results, args.head)
    except SystemExit:
        print(f"no asv results for {args.base} or {args.head} under {args.results}",
              file=sys.stderr)
        return 2
    gated = sum(1 for k in base if direction(*k) is not None and is_number(base[k]))
    failures, notes = compare(base, head, args.factor)
    if notes:
        print(f"Not gated (moved by more than {args.factor}x either way; for information: "
              f"load moves these):\n{table(notes)}")
    if failures:
        print(f"FAIL: {len(failures)} of {gated} gated figures (peak memory) are "
              f"worse by more than {args.factor}x:\n{table(failures)}")
        return 1
    print(f"OK: none of {gated} gated figures (peak memory) is worse by more than "
          f"{args.factor}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
