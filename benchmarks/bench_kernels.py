"""asv benchmarks of the numbabn kernels.

* `Kernels`: wall time of each kernel, writing into a preallocated ``out``.
* `PeakMem`: peak memory of the allocating calls.
* `BandwidthFloor`: kernel time over the time its bytes take at copy bandwidth.
* `VersusTensorFlow`: TensorFlow's fused batch norm on the same inputs.
* `FirstCall`: import + compile (or cache load) + first call, in a new process.

Every setup checks the kernels against a float64 NumPy reference before anything is
timed (``_common.checked_inputs``), so a wrong kernel fails its benchmarks instead of
being timed. asv imports this file as ``benchmarks.bench_kernels``, hence the relative
import of the shared helpers (``report.py`` uses them too).
"""

import os

# Before Numba or TensorFlow load (see _common): spinning OpenMP threads left by one
# library's kernel slow the other library's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

from ._common import (  # noqa: E402
    CASES, best_of, check_tf, checked_inputs, copy_bandwidth, first_call_cold,
    first_call_warm, floor_seconds, numbabn_ops, tf_ops,
)

ALL_CASES = list(CASES)
LARGE_CASES = ["nhwc", "nchw"]  # bandwidth-bound sizes; the small ones fit in cache


class Kernels:
    """Kernel time with ``out=`` preallocated, so allocation is not timed."""

    params = [ALL_CASES]
    param_names = ["case"]
    timeout = 300  # setup generates and checks 100 MB of inputs

    def setup(self, case):
        self.inp, _ = checked_inputs(*CASES[case])
        self.out = np.empty_like(self.inp["x"])
        self.ops = numbabn_ops(self.inp, self.out)

    def time_train(self, case):
        self.ops["train"]()

    def time_inference(self, case):
        self.ops["inference"]()

    def time_backward(self, case):
        self.ops["backward"]()

    def time_stats(self, case):
        """The statistics pass alone (half of the training forward's reads)."""
        self.ops["stats"]()


class PeakMem:
    """Peak memory of the allocating calls.

    asv reports the whole process's peak: interpreter, loaded kernels, inputs (x, dy),
    the checked setup and the call. Kept apart from `Kernels` so that no preallocated
    ``out`` adds to it; the setup's own peak (one output plus small reference slabs)
    stays below the call's plus one more full-size array, so a new temporary shows.
    """

    params = [ALL_CASES]
    param_names = ["case"]
    timeout = 300

    def setup(self, case):
        self.inp, _ = checked_inputs(*CASES[case])
        self.ops = numbabn_ops(self.inp, None)

    def peakmem_train(self, case):
        self.ops["train"]()

    def peakmem_backward(self, case):
        self.ops["backward"]()


class BandwidthFloor:
    """How far each kernel is from moving its bytes at copy bandwidth (1.0 = at it).

    The floor of an operation is ``BYTES_MOVED[op] * x.nbytes / copy bandwidth``, the
    bandwidth measured in the same benchmark on the same arrays as the faster of
    ``np.copyto`` and a parallel Numba copy; times are best of 10. The floor is a
    model: read-heavy operations can beat it slightly (below 1.0), since how a copy's
    writes reach memory (write-allocate or streaming stores) differs from a kernel's.
    """

    params = [LARGE_CASES]
    param_names = ["case"]
    timeout = 300

    def setup(self, case):
        self.inp, _ = checked_inputs(*CASES[case])
        self.out = np.empty_like(self.inp["x"])
        self.ops = numbabn_ops(self.inp, self.out)

    def _ratio(self, op):
        # Bandwidth before and after the kernel, the better one: on a shared machine
        # it drifts, and a drop during one measurement should not move the floor.
        x = self.inp["x"]
        before = copy_bandwidth(x, self.out)
        t = best_of(self.ops[op])
        bandwidth = max(before, copy_bandwidth(x, self.out))
        return t / floor_seconds(op, x.nbytes, bandwidth)

    def track_floor_ratio_train(self, case):
        return self._ratio("train")

    def track_floor_ratio_inference(self, case):
        return self._ratio("inference")

    def track_floor_ratio_backward(self, case):
        return self._ratio("backward")

    def track_copy_bandwidth(self, case):
        return copy_bandwidth(self.inp["x"], self.out) / 1e9

    track_floor_ratio_train.unit = "x floor"
    track_floor_ratio_inference.unit = "x floor"
    track_floor_ratio_backward.unit = "x floor"
    track_copy_bandwidth.unit = "GB/s"


class VersusTensorFlow:
    """``tf.raw_ops.FusedBatchNormV3`` / ``FusedBatchNormGradV3`` on the same inputs.

    Both layouts run: TF's CPU kernel takes NCHW by transposing internally, which is
    TF's own cost (see ``_common.tf_ops``). Setup raises NotImplementedError, which
    asv reports as skipped, when TensorFlow is not installed.

    The speed-up ratios (TF time / numbabn time) compare numbabn's *allocating* calls:
    TF allocates its outputs on every call, and a fresh 51 MB output costs a few ms of
    page faults, so comparing with ``out=`` timings would flatter numbabn.
    """

    params = [LARGE_CASES]
    param_names = ["case"]
    timeout = 300

    def setup(self, case):
        self.inp, ref = checked_inputs(*CASES[case])
        self.tf = tf_ops(self.inp)
        check_tf(self.tf, ref)
        self.nb = numbabn_ops(self.inp, None)

    def time_tf_fused_train(self, case):
        self.tf["train"]()

    def time_tf_fused_inference(self, case):
        self.tf["inference"]()

    def time_tf_fused_backward(self, case):
        self.tf["backward"]()

    def _speedup(self, op):
        return best_of(self.tf[op]) / best_of(self.nb[op])

    def track_speedup_vs_tf_train(self, case):
        return self._speedup("train")

    def track_speedup_vs_tf_inference(self, case):
        return self._speedup("inference")

    def track_speedup_vs_tf_backward(self, case):
        return self._speedup("backward")

    track_speedup_vs_tf_train.unit = "x"
    track_speedup_vs_tf_inference.unit = "x"
    track_speedup_vs_tf_backward.unit = "x"


class FirstCall:
    """Seconds to import numbabn and run a first train + backward in a new process,
    with an empty kernel cache (everything compiles) and with a populated one."""

    timeout = 600

    def track_first_call_cold(self):
        return first_call_cold()

    def track_first_call_warm_cache(self):
        return first_call_warm()

    track_first_call_cold.unit = "s"
    track_first_call_warm_cache.unit = "s"
