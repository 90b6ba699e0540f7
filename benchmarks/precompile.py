"""Compile a commit's kernels into its Numba cache before asv measures it.

``benchmarks/asv_commits.sh`` extracts each commit's numbabn/ to a fresh folder, so its
kernels compile from nothing (Numba compiles on one core, holding the GIL): ~100 s of
the suite's ``setup_cache`` on the 2-core machine, one core busy, the other idle. This
script compiles the kernels the suite runs, split in the two `PARTS` that
asv_commits.sh runs side by side, so that the compiling takes both cores; asv's
processes then load them from the cache. Nothing is timed here, and nothing timed
changes: every benchmark warms up before it measures, and `FirstCall` measures the cold
compile itself in a new process with its own empty cache. A kernel missing from the
parts only compiles later, in asv's process, as before.

The two processes write one cache, which Numba does not make safe for two processes
saving signatures of the same function at once (numba/numba#10128): here each save holds
an exclusive lock on a file beside the cache (`_serialize_cache_saves`).

Usage (PYTHONPATH names the commit's code, as ASV_PYTHONPATH does for asv):
``PYTHONPATH=<commit's tree> python benchmarks/precompile.py PART`` (0 or 1).
Not a benchmark module: asv imports it while discovering benchmarks and finds none.
"""

import sys
import time

#: what each process compiles: the kernels of bench_kernels' cases (`_common.CASES`) and
#: the TensorFlow op's float32 entry points ("op": bench_keras, bench_models). By dtype,
#: so that the two share little; cold seconds one after the other in one process on the
#: 2-core machine (2026-12-01): nhwc-f16 17.5, nhwc-bf16 20.2, nc-f64 13.7, small-f64
#: 3.4 | nchw 21.8, nhwc 14.1, nc 0.6, small 3.9, op 7.7 (each first one of a part also
#: compiles what all share).
PARTS = (("nhwc-f16", "nhwc-bf16", "nc-f64", "small-f64"),
         ("nchw", "nhwc", "nc", "small", "op"))


def _serialize_cache_saves(lock_path):
    """Make Numba's cache saves in this process take an exclusive lock on ``lock_path``:
    a save reads the function's index, adds its entry and writes both files back, and
    two processes doing that at once can leave an entry pointing at the other's data."""
    import fcntl

    from numba.core import caching

    save = caching.IndexDataCacheFile.save

    def locked_save(self, key, data):
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            return save(self, key, data)

    caching.IndexDataCacheFile.save = locked_save


def compile_case(case):
    """Run each kernel of ``case`` once into a preallocated ``out`` and once allocating:
    the specializations `bench_kernels` and `Peers` call."""
    import numpy as np

    from benchmarks._common import CASES, make_inputs, numbabn_ops

    if case not in CASES:  # bfloat16 without ml_dtypes
        return
    inp = make_inputs(*CASES[case])
    for out in (np.empty_like(inp["x"]), None):
        for fn in numbabn_ops(inp, out).values():
            fn()


def compile_op():
    """The TensorFlow op's float32 entry points (``keras_layer._native`` hands them over
    when the op loads)."""
    from numbabn import _kernels_cpu

    if hasattr(_kernels_cpu, "c_entry_points"):  # commits before the op have none
        _kernels_cpu.c_entry_points("float32")


def main(argv):
    import os

    import numbabn

    _serialize_cache_saves(os.path.join(os.path.dirname(numbabn.__file__),
                                        ".precompile.lock"))
    for job in PARTS[int(argv[0])]:
        start = time.perf_counter()
        try:
            compile_op() if job == "op" else compile_case(job)
        except Exception as exc:  # noqa: BLE001 - an old commit's API: asv compiles it later
            print(f"precompile {job}: skipped ({type(exc).__name__}: {exc})", flush=True)
            continue
        print(f"precompile {job}: {time.perf_counter() - start:.1f} s "
              f"({numbabn.__file__})", flush=True)


if __name__ == "__main__":
    # the repository root, for `benchmarks`: last, so that PYTHONPATH's numbabn comes first
    sys.path.append(__file__.rsplit("/", 2)[0])
    main(sys.argv[1:])
