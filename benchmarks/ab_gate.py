"""The kernels of two commits timed against each other in turns: the gate's A/B step.

``make bench-gate`` runs this after the whole suite's run on HEAD and `gate.py`::

    python benchmarks/ab_gate.py BASE HEAD [--factor 1.5] [--rounds 7]

Both commits' ``numbabn/`` are loaded into this one process, side by side, under other
names (``numbabn_base``, ``numbabn_head``: numbabn's modules import each other relatively),
from the copies the asv runs extracted and compiled (``.asv/code/<commit>``) or else from
a fresh extraction, which compiles. Their kernels then run on the *same* input and output
arrays, in turns (base, head, head, base, ...), a run being >= 20 ms of calls: a change
of load hits both alike, and so does where the arrays lie in memory. Two whole-suite runs
minutes apart promise neither (absolute times of unchanged code moved by 20-80 % between
runs on the shared 2-core machine, the suite's ratios to a copy timed in the same turns
by up to 1.48x; the same kernels in two worker processes, timed in turns, by up to 1.38x).
Every kernel (train, inference, backward, statistics; into a preallocated ``out``) of
every case `bench_kernels.Kernels` times and of a cache-sized one (`CASES`), on one
thread and on all of Numba's (a kernel that stopped running in parallel shows only
there): a figure is head's best run over base's. Then the peak memory of each
allocating call (`_common.call_peaks`, as `bench_kernels.PeakMem`; deterministic, so
once each): head's over base's, a change under `PEAK_SLACK` none. Any figure above
``--factor`` fails: exit status 1, else 0.
"""

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
import timeit
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: bench_kernels.KERNEL_CASES (not imported: that module imports TensorFlow and PyTorch),
#: and "nhwc-l3", a cache-sized case of 256 channels the asv suite does not time (see
#: `_common.CASES`)
CASES = ["nhwc", "nchw", "nc", "nhwc-f16", "nc-f64", "small", "small-f64", "nhwc-bf16",
         "nhwc-l3"]
OPS = ("train", "inference", "backward", "stats")
#: a timed run is at least this long (``number`` calls, the same for both commits)
MIN_SECONDS = 0.02
#: peak memory moved by less than this is not a change (`_common.call_peaks` rounds to
#: whole MiB; a statistics pass read 2 MiB in one run and 3 MiB in the next); a new
#: full-size temporary of the smallest large case is 26 MB
PEAK_SLACK = 8 * 2 ** 20


def load(name, folder):
    """The ``numbabn`` package in ``folder`` imported as ``name``. Refused (ValueError)
    where one of its modules imports ``numbabn`` by that name: that would be this
    process's other numbabn, not its own (``numbabn.torch``, not imported here, aside)."""
    init = Path(folder) / "numbabn" / "__init__.py"
    for path in init.parent.rglob("*.py"):
        if "torch" not in path.relative_to(init.parent).parts and re.search(
                r"^\s*(from|import)\s+numbabn\b", path.read_text(), re.MULTILINE):
            raise ValueError(f"{path} imports numbabn by name: cannot load it as {name}")
    spec = importlib.util.spec_from_file_location(
        name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def source(commit, scratch, code):
    """The folder holding ``commit``'s ``numbabn/``: the asv runs' copy where it is kept
    (``<code>/<full hash>``, see asv_commits.sh's ``CODE_ROOT``), else a new one."""
    full = subprocess.run(["git", "rev-parse", "--verify", commit + "^{commit}"], cwd=ROOT,
                          check=True, capture_output=True, text=True).stdout.strip()
    kept = Path(code) / full
    if (kept / "numbabn").is_dir():
        return kept, full
    folder = Path(scratch) / full
    folder.mkdir(exist_ok=True)
    archive = subprocess.run(["git", "archive", full, "numbabn"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder, full


def measure(libs, cases, rounds):
    """``{(case, op, threads): (base seconds, head seconds)}``: each the best of ``rounds``
    runs, the two ``libs`` (numbabn modules) taking turns, the order alternating by round;
    at one thread and at Numba's thread count."""
    import numba
    import numpy as np

    from benchmarks._common import CASES as SPECS, make_inputs, numbabn_ops

    previous = numba.get_num_threads()
    results = {}
    try:
        for case in cases:
            inp = make_inputs(*SPECS[case])
            out = np.empty_like(inp["x"])
            ops = [numbabn_ops(inp, out, lib) for lib in libs]
            for n in sorted({1, previous}):
                numba.set_num_threads(n)
                for op in OPS:
                    timers = [timeit.Timer(o[op]) for o in ops]
                    once = max(t.timeit(1) for t in timers for _ in range(2))  # warm first
                    number = max(1, int(MIN_SECONDS / max(once, 1e-9)))
                    best = [float("inf")] * len(timers)
                    for r in range(rounds):
                        order = range(len(timers)) if r % 2 == 0 else reversed(range(len(timers)))
                        for i in order:
                            best[i] = min(best[i], timers[i].timeit(number) / number)
                    results[(case, op, n)] = tuple(best)
    finally:
        numba.set_num_threads(previous)
    return results


def measure_peaks(libs, cases):
    """``{(case, op): (base bytes, head bytes)}``: `_common.call_peaks` of each lib
    (deterministic, so one measurement each). Last: it changes malloc's settings."""
    from benchmarks._common import call_peaks

    peaks = [call_peaks(cases, lib) for lib in libs]
    return {(case, op): tuple(p[case][op] for p in peaks)
            for case in cases for op in peaks[0][case]}


def memory_worse(b, h):
    """How much more memory head's call takes: ``h / b``, 1 within `PEAK_SLACK`."""
    if abs(h - b) < PEAK_SLACK:
        return 1.0
    return h / b if b > 0 else float("inf")


def report(results, factor, base, head, rounds, peaks=None):
    """``(text, failed)`` for `measure`'s results (a line per timing) and `measure_peaks`'
    (a line per call whose peak memory differs), then the verdict."""
    rows, failures = [], []
    for (case, op, n), (b, h) in results.items():
        worse = h / b
        rows.append(f"  {case:>10} {op:>9} {n} thread{'s' if n > 1 else ' '}: "
                    f"{1e3 * b:9.3f} -> {1e3 * h:9.3f} ms  ({worse:.2f}x)")
        if worse > factor:
            failures.append(rows[-1])
    lines = [f"A/B, {base[:8]} (base) against {head[:8]} (head), best of {rounds} runs "
             f"each, in turns:", *rows]
    peaks = peaks or {}
    changed = [(key, b, h) for key, (b, h) in peaks.items() if b != h]
    if peaks:
        lines.append(f"Peak memory of the allocating calls: {len(peaks) - len(changed)} of "
                     f"{len(peaks)} the same" + (", the others:" if changed else ""))
    for (case, op), b, h in changed:
        lines.append(f"  {case:>10} {op:>9}: {b / 2 ** 20:7.0f} -> {h / 2 ** 20:7.0f} MiB")
        if memory_worse(b, h) > factor:
            failures.append(lines[-1])
    n = len(results) + len(peaks)
    if failures:
        lines += [f"FAIL: {len(failures)} of {n} figures (kernel times, peak memory) are "
                  f"worse by more than {factor}x:", *failures]
    else:
        worst = max((h / b for b, h in results.values()), default=1.0)
        lines.append(f"OK: none of {n} figures (kernel times, peak memory) is worse by more "
                     f"than {factor}x (worst time {worst:.2f}x)")
    return "\n".join(lines), bool(failures)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("base")
    parser.add_argument("head")
    parser.add_argument("--factor", type=float, default=1.5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--cases", nargs="+", default=CASES)
    parser.add_argument("--code", default=str(ROOT / ".asv" / "code"),
                        help="where the asv runs kept each commit's code (CODE_ROOT)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="numbabn-ab-") as scratch:
        (base_src, base), (head_src, head) = (source(c, scratch, args.code)
                                              for c in (args.base, args.head))
        libs = [load("numbabn_base", base_src), load("numbabn_head", head_src)]
        from benchmarks._common import CASES as SPECS

        # nhwc-bf16 exists only where ml_dtypes is installed (as in bench_kernels)
        cases = [case for case in args.cases if case in SPECS]
        results = measure(libs, cases, args.rounds)
        peaks = measure_peaks(libs, cases)
    text, failed = report(results, args.factor, base, head, args.rounds, peaks)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
