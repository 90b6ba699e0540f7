"""asv benchmarks of the numbabn kernels.

* `Kernels`: wall time of each kernel, writing into a preallocated ``out``.
* `PeakMem`: how far the allocating calls raise the process's peak memory.
* `BandwidthFloor`: kernel time over the time its bytes take at copy bandwidth.
* `Peers`: numbabn, TensorFlow's fused batch norm and a plain NumPy implementation on
  the same inputs, timed in turns in one process (``setup_cache``), and the speed-ups.
* `Scaling`: time against input size, 10^4 to 10^7 elements: where the per-call
  overhead ends and memory bandwidth takes over.
* `Threads`: 1 thread against 2.
* `FirstCall`: import + compile (or cache load) + first call, in a new process.

Cases (``_common.CASES``): NHWC and NCHW 4-D, a 2-D (N, C), float16 NHWC and float64
(N, C), all ~13 M elements, and a cache-sized NHWC in float32 and float64; bfloat16 NHWC
(``ml_dtypes``, when installed) in `BandwidthFloor` and `Peers`.

The kernels are checked against a float64 NumPy reference before anything is timed,
so a wrong kernel fails its benchmarks instead of being timed, and everything is
measured in asv's ``setup_cache`` (`check_cases`, shared by the classes but `Scaling`
and `FirstCall`; asv runs it once per commit and fails all their benchmarks if it
raises): the kernels, the copy that makes their floor, the thread counts and the peers
take turns in that one process, and every class's ``track_`` methods return figures of
that measurement. Ratios of times from the same turns (time over floor, speed-ups) hold
under a drifting load, where the absolute times of the same code moved by 20-80 % from
one asv process to the next on the shared 2-core machine; and a process per benchmark
cost ~1-2 s each of loading inputs and warming up (~100 s a commit).

asv imports this file as ``benchmarks.bench_kernels``, hence the relative import of the
shared helpers (``report.py`` uses them too).
"""

import os
import sys
import tempfile

# Before Numba or TensorFlow load (see _common): spinning OpenMP threads left by one
# library's kernel slow the other library's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402
import numpy as np  # noqa: E402

from ._common import (  # noqa: E402
    ASV_SETTINGS, BYTES_MOVED, CASES, EPS, SMALL_RUN, _parallel_copy, best_of_interleaved,
    call_peaks, check_peer, checked_inputs, first_call_seconds, make_inputs, memo,
    numbabn_ops, preimport_frameworks, tf_ops,
)
from ._numpy_bn import numpy_ops  # noqa: E402

preimport_frameworks()  # once, in asv's forkserver (see _common)
rounds, repeat, warmup_time = (ASV_SETTINGS[k] for k in ("rounds", "repeat", "warmup_time"))

#: the cases of `Kernels` and `PeakMem`
ALL_CASES = ["nhwc", "nchw", "nc", "nhwc-f16", "nc-f64", "small", "small-f64"]
#: bandwidth-bound sizes; the small ones fit in cache. The half formats' NCHW cases are
#: left to ``report.py`` (the suite should not grow by more than a case per class).
LARGE_CASES = ["nhwc", "nchw", "nc", "nhwc-f16", "nc-f64"] + (
    ["nhwc-bf16"] if "nhwc-bf16" in CASES else [])
#: the cases every peer runs (TF's fused op has no float64)
PEER_CASES = ["nhwc", "nchw", "nc", "nhwc-f16", "small"] + (
    ["nhwc-bf16"] if "nhwc-bf16" in CASES else [])


def check_cases():
    """Check numbabn on every case against float64, then measure everything the classes
    here but `Scaling` and `FirstCall` report: the ``setup_cache`` they share.

    Returns ``{"names": the cases checked, "kernels": measure_kernels(), "threads":
    measure_threads(), "peers": measure_peers(), "peak": measure_peaks()}``: asv passes
    a setup_cache's result, unless None, as the first argument of ``setup`` and of
    every benchmark (the ``_`` there), and each ``track_`` method returns one figure of
    it. Why one process measures it all: on a machine shared with other work the load
    drifts between asv's benchmark processes (absolute times of the same code moved by
    20-80 % between runs here), while figures taken in turns in one process (a kernel
    against a copy of the same bytes, numbabn against a peer) held; and each process
    re-loaded or regenerated 51 MB inputs. One setup_cache for all: the peers' checks
    reuse the float64 references computed here.
    """
    names = list(dict.fromkeys(ALL_CASES + LARGE_CASES + PEER_CASES))
    for case in names:
        checked_inputs(*CASES[case])
    kernels = measure_kernels()
    threads = measure_threads()
    peers = measure_peers()
    # last: `peak_increase` sets malloc's mmap threshold for the rest of the process
    return {"names": names, "kernels": kernels, "threads": threads, "peers": peers,
            "peak": measure_peaks()}


#: the cases `measure_kernels` times (`Kernels` and `BandwidthFloor`)
KERNEL_CASES = list(dict.fromkeys(ALL_CASES + LARGE_CASES))
#: best of this many runs (each >= 20 ms of calls) of every kernel and copy, in turns
KERNEL_REPEAT = 1 if SMALL_RUN else 7
KERNEL_OPS = ("train", "inference", "backward", "stats")


def copy_fns(x, out):
    """``{"copy_numpy", "copy_numba"}``: a copy of ``x`` into ``out``, NumPy's (one
    thread) and a parallel Numba loop's (the kernels' threads), as unsigned integers of
    the same width (Numba has no float16)."""
    as_uint = np.dtype(f"u{x.itemsize}")
    s, d = x.reshape(-1).view(as_uint), out.reshape(-1).view(as_uint)
    return {"copy_numpy": lambda: np.copyto(d, s), "copy_numba": lambda: _parallel_copy(s, d)}


def measure_kernels():
    """``{case: {"ms", "ms_1thread": {op: ms per call}, "copy_ms", "copy_1thread_ms",
    "nbytes"}}`` for every `KERNEL_CASES` case: the four kernels (writing into a
    preallocated ``out``) on every Numba thread and on one, and a copy of ``x`` into the
    same ``out`` (`copy_fns`: NumPy's, one thread, and a parallel Numba loop's), all
    timed in turns, best of `KERNEL_REPEAT` runs each (`best_of_interleaved`).
    ``copy_ms`` (the faster copy) makes `BandwidthFloor`'s floor, ``copy_1thread_ms``
    (NumPy's) the one-thread floor: measured in the same turns, a change of load moves
    kernel and floor alike. On one thread more so: a parallel kernel on the 2-core
    machine needs both cores at once, which other work takes from it more often than the
    one core a copy needs (its floor ratio moved by up to 1.7x between two runs of the
    same code there), so the gate (``benchmarks/gate.py``) reads the one-thread ratios."""
    previous = numba.get_num_threads()
    results = {}
    try:
        for case in KERNEL_CASES:
            inp, out, ops = kernel_ops(case)
            fns = {}
            for op in KERNEL_OPS:
                def on(n, fn=ops[op]):
                    def run():
                        numba.set_num_threads(n)
                        fn()
                    return run
                fns[op] = on(previous)
                fns[(op, 1)] = on(1)
            fns.update(copy_fns(inp["x"], out))
            t = best_of_interleaved(fns, KERNEL_REPEAT)
            results[case] = {"ms": {op: 1e3 * t[op] for op in KERNEL_OPS},
                             "ms_1thread": {op: 1e3 * t[(op, 1)] for op in KERNEL_OPS},
                             "copy_ms": 1e3 * min(t["copy_numpy"], t["copy_numba"]),
                             "copy_1thread_ms": 1e3 * t["copy_numpy"],
                             "nbytes": inp["x"].nbytes}
    finally:
        numba.set_num_threads(previous)
    return results


#: the `Threads` cases and thread counts
THREAD_CASES, THREAD_COUNTS = ["nhwc", "nchw"], [1, 2]


def measure_threads():
    """``{case: {op: {threads: ms}}}``: train and backward of `THREAD_CASES` at each of
    `THREAD_COUNTS` (``numba.set_num_threads``), the counts taking turns; ``{"skip":
    why}`` with fewer Numba threads than the largest count."""
    if numba.config.NUMBA_NUM_THREADS < max(THREAD_COUNTS):
        return {"skip": f"needs {max(THREAD_COUNTS)} Numba threads"}
    previous = numba.get_num_threads()
    results = {}
    try:
        for case in THREAD_CASES:
            _, _, ops = kernel_ops(case)
            results[case] = {}
            for op in ("train", "backward"):
                def on(n, fn=ops[op]):
                    def run():
                        numba.set_num_threads(n)
                        fn()
                    return run
                t = best_of_interleaved({n: on(n) for n in THREAD_COUNTS}, KERNEL_REPEAT)
                results[case][op] = {n: 1e3 * t[n] for n in THREAD_COUNTS}
    finally:
        numba.set_num_threads(previous)
    return results


def measure_peaks():
    """``{case: {op: bytes}}`` (`PeakMem`): `_common.call_peaks` of every `ALL_CASES`
    case; ``{"skip": why}`` where it cannot be measured."""
    try:
        return call_peaks(ALL_CASES)
    except NotImplementedError as exc:
        return {"skip": str(exc)}


#: best of this many runs per peer and operation in `measure_peers` (in turns)
PEER_REPEAT = 1 if SMALL_RUN else 4
PEERS = ("numbabn", "tf_fused", "numpy")
PEER_OPS = ("train", "inference", "backward")


def measure_peers():
    """Check the NumPy peer and TF's fused op on `PEER_CASES` against float64, then time
    all three peers in turns (``setup_cache`` of `Peers`).

    Returns ``{case: {"failed": {peer: why it cannot be timed}, "ms": {op: {peer: ms}}}}``
    with the peers that failed their check (or, for TF, are not installed) left out of
    ``ms``; only their benchmarks fail, each with the reason. A failed check is also
    printed at once to stderr, which asv shows. numbabn itself is checked by
    `check_cases` (and again by `checked_inputs` here: this is another process).

    Why in one process: the three peers must be timed in turns (load drifts on a shared
    machine), and building TF's tensors and checking each peer on 51 MB inputs would
    otherwise be repeated in each of 90 asv processes.
    """
    results = {}
    for case in PEER_CASES:
        inp, ref = checked_inputs(*CASES[case])
        failed, ops = {}, {"numbabn": numbabn_ops(inp, None)}
        for peer, make_ops in (("numpy", lambda: numpy_ops(inp, EPS)),
                               ("tf_fused", lambda: tf_ops(inp))):
            try:
                peer_ops = make_ops()
                check_peer(peer, peer_ops, ref)
            except NotImplementedError as exc:
                failed[peer] = str(exc)
            except AssertionError as exc:
                failed[peer] = f"failed its check against float64: {exc}"
                print(f"PEER CHECK FAILED ({case}): {peer} {exc}; its benchmarks of this "
                      "case will fail, the others run", file=sys.stderr, flush=True)
            else:
                ops[peer] = peer_ops
        # warm: each peer's ops ran in its check, numbabn's kernels in checked_inputs
        ms = {op: {peer: 1e3 * t for peer, t in best_of_interleaved(
            {peer: peer_ops[op] for peer, peer_ops in ops.items()}, PEER_REPEAT,
            warm=True).items()}
            for op in PEER_OPS}
        results[case] = {"failed": failed, "ms": ms}
    return results


# checks 9 cases, times 8 cases' kernels and copies in turns, 1 thread against 2, then
# checks and times 6 cases x 3 peers x 3 operations: ~1.5 min on 2 cores
check_cases.timeout = 900


def inputs(case, checked=None):
    """The seeded inputs of a case (checked by `check_cases`)."""
    return make_inputs(*CASES[case])


_built = {}


def kernel_ops(case, checked=None, preallocated=True):
    """``(inputs, out, numbabn_ops)`` of a case, built once per process (`memo`)."""
    def build():
        inp = inputs(case, checked)
        out = np.empty_like(inp["x"]) if preallocated else None
        return inp, out, numbabn_ops(inp, out)
    return memo(_built, (case, preallocated), build)


class Kernels:
    """ms per call of each kernel with ``out=`` preallocated (allocation not timed),
    timed in turns with a copy of the same bytes in ``setup_cache`` (`measure_kernels`,
    best of `KERNEL_REPEAT` runs). Absolute times: they move with the machine's load;
    `BandwidthFloor`'s ratios from the same turns do not."""

    params = [ALL_CASES]
    param_names = ["case"]
    timeout = 300

    setup_cache = staticmethod(check_cases)

    def setup(self, checked, case):
        self.ms = checked["kernels"][case]["ms"]

    def track_ms_train(self, _, case):
        return self.ms["train"]

    def track_ms_inference(self, _, case):
        return self.ms["inference"]

    def track_ms_backward(self, _, case):
        return self.ms["backward"]

    def track_ms_stats(self, _, case):
        """The statistics pass alone (half of the training forward's reads)."""
        return self.ms["stats"]

    track_ms_train.unit = "ms"
    track_ms_inference.unit = "ms"
    track_ms_backward.unit = "ms"
    track_ms_stats.unit = "ms"


class PeakMem:
    """Peak memory of the allocating calls: bytes by which one call raises the process's
    resident high-water mark (`_common.peak_increase`), outputs included.

    The call's own memory, not the whole process's (asv's ``peakmem_*`` report the
    process's high-water mark, which in a process forked from asv's server starts at the
    server's, TensorFlow and PyTorch included). A new full-size temporary in a kernel
    shows as a step of ``x.nbytes``: 1.5x or 2x the figure for the large cases (train:
    y; backward: dx; inference: y; stats: ~0), where the process's peak moved by a few
    per cent. Deterministic: one measurement after a warm-up call, for every case in
    ``setup_cache`` (`measure_peaks`; ~1 s in all, where a process per case and call
    took ~35 s a commit). Linux only (skipped elsewhere).
    """

    params = [ALL_CASES]
    param_names = ["case"]
    timeout = 300

    setup_cache = staticmethod(check_cases)

    def setup(self, checked, case):
        if "skip" in checked["peak"]:
            raise NotImplementedError(checked["peak"]["skip"])
        self.peak = checked["peak"][case]

    def _peak(self, op):
        return self.peak[op]

    def track_peak_increase_train(self, _, case):
        return self._peak("train")

    def track_peak_increase_inference(self, _, case):
        return self._peak("inference")

    def track_peak_increase_backward(self, _, case):
        return self._peak("backward")

    def track_peak_increase_stats(self, _, case):
        return self._peak("stats")

    track_peak_increase_train.unit = "bytes"
    track_peak_increase_inference.unit = "bytes"
    track_peak_increase_backward.unit = "bytes"
    track_peak_increase_stats.unit = "bytes"


class BandwidthFloor:
    """How far each kernel is from moving its bytes at copy bandwidth (1.0 = at it).

    The floor of an operation is ``BYTES_MOVED[op] * x.nbytes`` at the bandwidth of a
    copy of ``x`` into the same ``out`` (the faster of ``np.copyto`` and a parallel
    Numba copy), the copy timed in turns with the kernels in ``setup_cache``
    (`measure_kernels`): a kernel's time over the floor is a ratio of two times from
    the same turns, which holds under a drifting load where each alone moves (the suite's
    gate, ``make bench-gate``, compares such figures). The floor is a model: read-heavy
    operations can beat it slightly (below 1.0), since how a copy's writes reach memory
    (write-allocate or streaming stores) differs from a kernel's. The small cases fit in
    cache: their ratio is to an in-cache copy, and mostly per-call overhead.
    ``track_floor_ratio_1thread_*``: the kernel on one Numba thread against NumPy's
    (one-thread) copy, from the same turns: steadier under load (see `measure_kernels`),
    and what ``make bench-gate`` fails on.
    """

    params = [KERNEL_CASES]
    param_names = ["case"]
    timeout = 300

    setup_cache = staticmethod(check_cases)

    def setup(self, checked, case):
        self.result = checked["kernels"][case]

    def _ratio(self, op, threads=""):
        copy_ms = self.result[f"copy{threads}_ms"]
        return (self.result["ms" + threads][op]
                / (BYTES_MOVED[op] / BYTES_MOVED["copy"] * copy_ms))

    def track_floor_ratio_train(self, _, case):
        return self._ratio("train")

    def track_floor_ratio_inference(self, _, case):
        return self._ratio("inference")

    def track_floor_ratio_backward(self, _, case):
        return self._ratio("backward")

    def track_floor_ratio_stats(self, _, case):
        return self._ratio("stats")

    def track_floor_ratio_1thread_train(self, _, case):
        """On one thread, against NumPy's one-thread copy (what the gate reads)."""
        return self._ratio("train", "_1thread")

    def track_floor_ratio_1thread_inference(self, _, case):
        return self._ratio("inference", "_1thread")

    def track_floor_ratio_1thread_backward(self, _, case):
        return self._ratio("backward", "_1thread")

    def track_floor_ratio_1thread_stats(self, _, case):
        return self._ratio("stats", "_1thread")

    def track_copy_bandwidth(self, _, case):
        nbytes = self.result["nbytes"]
        return BYTES_MOVED["copy"] * nbytes / (1e-3 * self.result["copy_ms"]) / 1e9

    track_floor_ratio_train.unit = "x floor"
    track_floor_ratio_inference.unit = "x floor"
    track_floor_ratio_backward.unit = "x floor"
    track_floor_ratio_stats.unit = "x floor"
    track_floor_ratio_1thread_train.unit = "x floor"
    track_floor_ratio_1thread_inference.unit = "x floor"
    track_floor_ratio_1thread_backward.unit = "x floor"
    track_floor_ratio_1thread_stats.unit = "x floor"
    track_copy_bandwidth.unit = "GB/s"


class Peers:
    """numbabn, TensorFlow's fused kernel and plain NumPy doing the same work.

    * ``tf_fused``: ``tf.raw_ops.FusedBatchNormV3`` / ``FusedBatchNormGradV3``. TF's CPU
      kernel takes NCHW by transposing internally, which is TF's own cost (see
      ``_common.tf_ops``); (N, C) runs as (N, 1, 1, C).
    * ``numpy``: vectorized NumPy expressions (``_numpy_bn``), as a user writes them.
    * ``numbabn``: the *allocating* calls, since both peers allocate their outputs on
      every call (a fresh 51 MB output costs a few ms of page faults here).

    Measured in ``setup_cache`` (`check_cases` runs `measure_peers`): each peer is checked against the
    float64 reference first, within its own float32 accuracy
    (`_common.peer_tolerance`), then the three take turns, best of `PEER_REPEAT` runs
    each. ``track_ms_<peer>_<op>`` is a peer's ms per call; ``track_speedup_vs_*`` a
    peer's time over numbabn's from the same turns. A peer that failed its check fails
    only its own benchmarks, with the reason.
    """

    params = [PEER_CASES]
    param_names = ["case"]
    timeout = 300

    setup_cache = staticmethod(check_cases)

    def setup(self, checked, case):
        self.failed = checked["peers"][case]["failed"]
        self.ms = checked["peers"][case]["ms"]

    def _ms(self, peer, op):
        """A peer's ms per call; a peer that failed its check (or is missing) fails only
        the benchmarks that read it, with the reason."""
        if peer in self.failed:
            raise RuntimeError(f"{peer} is not timed: {self.failed[peer]}")
        return self.ms[op][peer]

    def _speedup(self, peer, op):
        return self._ms(peer, op) / self._ms("numbabn", op)

    def track_ms_numbabn_train(self, _, case):
        return self._ms("numbabn", "train")

    def track_ms_numbabn_inference(self, _, case):
        return self._ms("numbabn", "inference")

    def track_ms_numbabn_backward(self, _, case):
        return self._ms("numbabn", "backward")

    def track_ms_tf_fused_train(self, _, case):
        return self._ms("tf_fused", "train")

    def track_ms_tf_fused_inference(self, _, case):
        return self._ms("tf_fused", "inference")

    def track_ms_tf_fused_backward(self, _, case):
        return self._ms("tf_fused", "backward")

    def track_ms_numpy_train(self, _, case):
        return self._ms("numpy", "train")

    def track_ms_numpy_inference(self, _, case):
        return self._ms("numpy", "inference")

    def track_ms_numpy_backward(self, _, case):
        return self._ms("numpy", "backward")

    def track_speedup_vs_tf_train(self, _, case):
        return self._speedup("tf_fused", "train")

    def track_speedup_vs_tf_inference(self, _, case):
        return self._speedup("tf_fused", "inference")

    def track_speedup_vs_tf_backward(self, _, case):
        return self._speedup("tf_fused", "backward")

    def track_speedup_vs_numpy_train(self, _, case):
        return self._speedup("numpy", "train")

    def track_speedup_vs_numpy_inference(self, _, case):
        return self._speedup("numpy", "inference")

    def track_speedup_vs_numpy_backward(self, _, case):
        return self._speedup("numpy", "backward")

    track_ms_numbabn_train.unit = "ms"
    track_ms_numbabn_inference.unit = "ms"
    track_ms_numbabn_backward.unit = "ms"
    track_ms_tf_fused_train.unit = "ms"
    track_ms_tf_fused_inference.unit = "ms"
    track_ms_tf_fused_backward.unit = "ms"
    track_ms_numpy_train.unit = "ms"
    track_ms_numpy_inference.unit = "ms"
    track_ms_numpy_backward.unit = "ms"
    track_speedup_vs_tf_train.unit = "x"
    track_speedup_vs_tf_inference.unit = "x"
    track_speedup_vs_tf_backward.unit = "x"
    track_speedup_vs_numpy_train.unit = "x"
    track_speedup_vs_numpy_inference.unit = "x"
    track_speedup_vs_numpy_backward.unit = "x"


#: elements of the `Scaling` inputs, (n / 100, 100) float32: four decades
#: 10^8 (400 MB arrays, ~30 s of input and check a commit) was dropped: 10^7 (40 MB) is
#: already far out of cache, at copy bandwidth like 10^8 was
SIZES = [10 ** 3, 10 ** 4, 10 ** 5] if SMALL_RUN else [10 ** k for k in range(4, 8)]
SCALING_OPS = ("train", "inference", "backward")


def _scaling_case(elements):
    return (elements // 100, 100), 1, np.float32


def measure_scaling():
    """``{elements: {op: ms}}`` (setup_cache of `Scaling`): each size checked against
    float64, then its three kernels timed in turns, best of `KERNEL_REPEAT` runs."""
    results = {}
    for elements in SIZES:
        inp, _ = checked_inputs(*_scaling_case(elements))
        ops = numbabn_ops(inp, np.empty_like(inp["x"]))
        t = best_of_interleaved({op: ops[op] for op in SCALING_OPS}, KERNEL_REPEAT)
        results[elements] = {op: 1e3 * t[op] for op in SCALING_OPS}
    return results


measure_scaling.timeout = 600


class Scaling:
    """Time against input size: float32 (n / 100, 100), 10^4 to 10^7 elements.

    Below ``numbabn.config.SERIAL_BELOW`` (2^19) elements the kernels run on the calling
    thread and the ~50 us of Python around each call dominates; from ~10^6 elements on
    the time grows with the bytes. ``track_gbps_*`` is the bytes the operation must
    move (``_common.BYTES_MOVED``) over its time: flat once bandwidth-bound, and to be
    read against `BandwidthFloor.track_copy_bandwidth`. Measured in ``setup_cache``
    (`measure_scaling`), after a float64 check of every size.
    """

    params = [SIZES]
    param_names = ["elements"]
    timeout = 900

    setup_cache = staticmethod(measure_scaling)

    def setup(self, results, elements):
        self.ms = results[elements]
        self.nbytes = 4 * elements

    def track_ms_train(self, _, elements):
        return self.ms["train"]

    def track_ms_inference(self, _, elements):
        return self.ms["inference"]

    def track_ms_backward(self, _, elements):
        return self.ms["backward"]

    def _gbps(self, op):
        return BYTES_MOVED[op] * self.nbytes / (1e-3 * self.ms[op]) / 1e9

    def track_gbps_train(self, _, elements):
        return self._gbps("train")

    def track_gbps_backward(self, _, elements):
        return self._gbps("backward")

    track_ms_train.unit = "ms"
    track_ms_inference.unit = "ms"
    track_ms_backward.unit = "ms"
    track_gbps_train.unit = "GB/s"
    track_gbps_backward.unit = "GB/s"


class Threads:
    """1 thread against 2 (``numba.set_num_threads``) on the large 4-D cases.

    Results are bitwise the same at any thread count (tests/test_threads.py); only the
    time changes. ``track_ms_*`` at this thread count and
    ``track_speedup_over_1_thread_*`` (the 1-thread time over this count's; 1.0 at 1
    thread), the counts timed in turns in ``setup_cache`` (`measure_threads`). Needs 2
    Numba threads (NUMBA_NUM_THREADS), otherwise skipped.
    """

    params = [THREAD_CASES, THREAD_COUNTS]
    param_names = ["case", "threads"]
    timeout = 300

    setup_cache = staticmethod(check_cases)

    def setup(self, checked, case, threads):
        if "skip" in checked["threads"]:
            raise NotImplementedError(checked["threads"]["skip"])
        self.ms = checked["threads"][case]

    def track_ms_train(self, _, case, threads):
        return self.ms["train"][threads]

    def track_ms_backward(self, _, case, threads):
        return self.ms["backward"][threads]

    def track_speedup_over_1_thread_train(self, _, case, threads):
        return self.ms["train"][1] / self.ms["train"][threads]

    def track_speedup_over_1_thread_backward(self, _, case, threads):
        return self.ms["backward"][1] / self.ms["backward"][threads]

    track_ms_train.unit = "ms"
    track_ms_backward.unit = "ms"
    track_speedup_over_1_thread_train.unit = "x"
    track_speedup_over_1_thread_backward.unit = "x"


def measure_first_call():
    """``{"cold": s, "warm": s}`` (setup_cache of `FirstCall`): a new process's import +
    first train + backward with an empty kernel cache, then, on the cache that run
    filled, the best of two more (each a new process). One cold compile a commit: the
    warm figure used to fill its own cache first, a second compile (~10-15 s)."""
    with tempfile.TemporaryDirectory(prefix="numbabn-first-call-") as d:
        cold = first_call_seconds(d)
        warm = min(first_call_seconds(d) for _ in range(2))
    return {"cold": cold, "warm": warm}


measure_first_call.timeout = 600


class FirstCall:
    """Seconds to import numbabn and run a first train + backward in a new process,
    with an empty kernel cache (everything compiles) and with a populated one
    (`measure_first_call`)."""

    timeout = 600

    setup_cache = staticmethod(measure_first_call)

    def track_first_call_cold(self, results):
        return results["cold"]

    def track_first_call_warm_cache(self, results):
        return results["warm"]

    track_first_call_cold.unit = "s"
    track_first_call_warm_cache.unit = "s"
