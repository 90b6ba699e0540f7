"""The performance gate's whole-suite step: HEAD's asv results, and what moved since base.

``make bench-gate`` runs the whole suite on HEAD (and on base first with
``GATE_BASE_SUITE=1``), then this, then ``ab_gate.py``::

    python benchmarks/gate.py BASE HEAD [--factor 1.5] [--results .asv/results]

(BASE and HEAD: revisions, or asv result files.)

Fails (exit status 1) on a figure HEAD's run did not produce: a benchmark that failed,
e.g. a kernel that fails its float64 check, which fails every figure of its
``setup_cache``. Where base has stored results (``make bench-history`` keeps main's,
``GATE_BASE_SUITE=1`` makes them), every figure that moved by more than ``--factor``
either way is listed, for information only: on the shared 2-core machine the absolute
times of unchanged code moved by 20-80 % between two runs (``main`` against ``main``
flagged 28 of ~330 figures at 1.5x), numbabn's speed-ups over the peers by up to 2.6x (a
NumPy or TensorFlow call responds to the load its own way) and even each kernel on one
thread over NumPy's copy of the same bytes, timed in the same turns, by up to 1.48x.
What is gated, kernel times and peak memory, ``ab_gate.py`` measures: both commits'
kernels in one process, in turns, on the same arrays (a kernel doing twice its work read
1.64-2.25x there in the large cases, unchanged code moved by at most 1.12-1.29x; the
one-thread floor ratios of two whole-suite runs, this step's gate until 2026-12-01, read
1.53-2.32x for the same slowdown).

Exit status 2 when HEAD has no results.
"""

import argparse
import itertools
import json
import math
import subprocess
import sys
from pathlib import Path


def load(results_dir, commit):
    """``{(benchmark, params): value}`` from an asv result file (``commit`` a path to
    one: ``make bench-gate`` keeps base's as .asv/gate-base.json) or from the result
    files of ``commit`` (a revision; the newest last when there are several); None when
    there are none."""
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
    return values if found else None


def is_number(v):
    return isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))


def compare(base, head, factor):
    """``(failures, notes)``: rows ``(name, params, base, head, moved-by)``. A failure is
    a figure HEAD did not produce (None: the benchmark failed; NaN, a skip, is not) that
    base did, or any when there is no base; a note, a figure that moved by more than
    ``factor`` either way."""
    failures, notes = [], []
    for key in sorted(set(base or {}) | set(head)):
        b, h = (base or {}).get(key), head.get(key)
        if h is None and (base is None or is_number(b)):
            failures.append((*key, b, h, float("inf")))
        elif is_number(b) and is_number(h) and b > 0 and h > 0:
            moved = max(h / b, b / h)
            if moved > factor:
                notes.append((*key, b, h, moved))
    return failures, notes


def fmt(v):
    return "-" if v is None else format(v, ".4g")


def table(rows):
    return "\n".join(f"  {name} [{params}]: {fmt(b)} -> {fmt(h)}  ({worse:.2f}x)"
                     for name, params, b, h, worse in rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("head")
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--results", default=".asv/results")
    args = parser.parse_args(argv)
    head = load(args.results, args.head)
    if head is None:
        print(f"no asv results for {args.head} under {args.results}", file=sys.stderr)
        return 2
    base = load(args.results, args.base)
    if base is None:
        print(f"No stored asv results for {args.base}: HEAD's figures are not compared "
              "with it (GATE_BASE_SUITE=1 runs the suite on it first; make bench-history "
              "keeps main's); ab_gate.py gates kernel times and memory either way.")
    failures, notes = compare(base, head, args.factor)
    if notes:
        print(f"Moved by more than {args.factor}x either way (for information: load moves "
              f"these; ab_gate.py gates kernel times and memory):\n{table(notes)}")
    if failures:
        print(f"FAIL: {len(failures)} figures of HEAD's run are missing (failed):\n"
              f"{table(failures)}")
        return 1
    print(f"OK: none of the {len(head)} figures of HEAD's run failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
