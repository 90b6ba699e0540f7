"""asv benchmarks of the Keras layer (``keras_layer.BatchNormalization``).

* `KerasLayer`: one training step inside a ``tf.function`` (forward with batch
  statistics, moving-average update, backward to x, gamma and beta through
  ``tape.gradient`` of ``sum(y * w)``), inference inside a ``tf.function``, and an eager
  training-mode call (forward + moving update, no ``tf.function``), for the stock Keras 3
  layer, ours, and TF's fused op (``FusedBatchNormV3`` + its gradient, Keras's moving
  update), plus the speed-up ratios. All three are first checked against the stock
  layer.
* `Bridge`: what ``tf.numpy_function`` itself costs: per call on a tiny tensor, and at
  51 MB whether TensorFlow copies the returned array (it does unless 64-byte aligned).

Both measure in ``setup_cache`` (once per commit, in one process) and their ``track_``
methods return figures of that measurement, as `bench_models` does: the kinds must be
timed in turns in one process (load drifts on a shared machine), and building and
tracing the three layers' ``tf.function``s takes seconds, which asv (one process per
benchmark, ``setup`` re-run before every sample) repeated ~30 times per case.

Helpers live in ``_keras_common.py`` (shared with ``keras_report.py``).
"""

import os

# Before Numba or TensorFlow load (see _common): spinning OpenMP threads left by one
# library's kernel slow the other library's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ._common import ASV_SETTINGS, SMALL_RUN, best_of_interleaved, preimport_frameworks  # noqa: E402
from ._keras_common import (  # noqa: E402
    KERAS_CASES, KINDS, TIMED, bridge_fns, build_fns, check_agreement, zero_copy,
)

preimport_frameworks()  # once, in asv's forkserver (see _common)
rounds, repeat, warmup_time = (ASV_SETTINGS[k] for k in ("rounds", "repeat", "warmup_time"))

#: best of this many runs of each kind, in turns (each run >= 20 ms of calls)
KERAS_REPEAT = 1 if SMALL_RUN else 4


def _tensorflow_missing():
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as exc:
        return f"tensorflow/keras not importable: {exc}"
    return None


def measure_keras_layers():
    """``{case: {call: {kind: ms}}}`` for every `KERAS_CASES` case (setup_cache of
    `KerasLayer`), or ``{"skip": why}`` without TensorFlow. Raises AssertionError if a
    layer disagrees with the stock one (`check_agreement`), before anything is timed."""
    why = _tensorflow_missing()
    if why:
        return {"skip": why}
    results = {}
    for case, spec in KERAS_CASES.items():
        fns = build_fns(*spec)
        # also traces every tf.function, so no timed call includes tracing
        check_agreement(fns)
        results[case] = {call: {kind: 1e3 * t for kind, t in best_of_interleaved(
            {kind: fns[kind][call] for kind in KINDS}, KERAS_REPEAT).items()}
            for call in TIMED}
    return results


measure_keras_layers.timeout = 600


class KerasLayer:
    """Training step, inference and an eager call: stock Keras layer vs numbabn's vs
    TF's fused op, ms per call, each the best of `KERAS_REPEAT` runs taken in turns.

    ``track_speedup_*`` are stock (or fused) time / numbabn time from the same turns.
    """

    params = [list(KERAS_CASES)]
    param_names = ["case"]
    timeout = 300

    setup_cache = staticmethod(measure_keras_layers)

    def setup(self, results, case):
        if "skip" in results:
            raise NotImplementedError(results["skip"])
        self.ms = results[case]

    def _speedup(self, other, call):
        return self.ms[call][other] / self.ms[call]["numbabn"]

    def track_ms_train_stock(self, results, case):
        return self.ms["train"]["stock"]

    def track_ms_train_numbabn(self, results, case):
        return self.ms["train"]["numbabn"]

    def track_ms_train_fused(self, results, case):
        return self.ms["train"]["fused"]

    def track_ms_inference_stock(self, results, case):
        return self.ms["inference"]["stock"]

    def track_ms_inference_numbabn(self, results, case):
        return self.ms["inference"]["numbabn"]

    def track_ms_inference_fused(self, results, case):
        return self.ms["inference"]["fused"]

    def track_ms_eager_stock(self, results, case):
        return self.ms["eager"]["stock"]

    def track_ms_eager_numbabn(self, results, case):
        return self.ms["eager"]["numbabn"]

    def track_ms_eager_fused(self, results, case):
        return self.ms["eager"]["fused"]

    def track_speedup_vs_stock_train(self, results, case):
        return self._speedup("stock", "train")

    def track_speedup_vs_fused_train(self, results, case):
        return self._speedup("fused", "train")

    def track_speedup_vs_stock_inference(self, results, case):
        return self._speedup("stock", "inference")

    def track_speedup_vs_fused_inference(self, results, case):
        return self._speedup("fused", "inference")

    def track_speedup_vs_stock_eager(self, results, case):
        return self._speedup("stock", "eager")

    def track_speedup_vs_fused_eager(self, results, case):
        return self._speedup("fused", "eager")

    track_ms_train_stock.unit = "ms"
    track_ms_train_numbabn.unit = "ms"
    track_ms_train_fused.unit = "ms"
    track_ms_inference_stock.unit = "ms"
    track_ms_inference_numbabn.unit = "ms"
    track_ms_inference_fused.unit = "ms"
    track_ms_eager_stock.unit = "ms"
    track_ms_eager_numbabn.unit = "ms"
    track_ms_eager_fused.unit = "ms"
    track_speedup_vs_stock_train.unit = "x"
    track_speedup_vs_fused_train.unit = "x"
    track_speedup_vs_stock_inference.unit = "x"
    track_speedup_vs_fused_inference.unit = "x"
    track_speedup_vs_stock_eager.unit = "x"
    track_speedup_vs_fused_eager.unit = "x"


#: the `bridge_fns` calls `Bridge` reports (us per call)
BRIDGE_CALLS = ("identity", "noop", "fresh_aligned", "fresh_unaligned", "prealloc_aligned",
                "prealloc_unaligned", "numpy_copy")


def measure_bridge():
    """``{"us": {call: us}, "overhead_us", "boundary_copy_ms", "output_zero_copy"}``
    (setup_cache of `Bridge`), or ``{"skip": why}`` without TensorFlow."""
    why = _tensorflow_missing()
    if why:
        return {"skip": why}
    fns = bridge_fns()
    for fn in fns.values():  # trace each tf.function now, not in a timed call
        fn()
    t = best_of_interleaved({k: fns[k] for k in BRIDGE_CALLS}, 3 if SMALL_RUN else 5)
    # the per-call cost: a tiny difference, so more runs of these two alone
    small = best_of_interleaved({k: fns[k] for k in ("noop", "identity")},
                                3 if SMALL_RUN else 15)
    return {"us": {k: 1e6 * v for k, v in t.items()},
            "overhead_us": 1e6 * (small["noop"] - small["identity"]),
            "boundary_copy_ms": 1e3 * (t["prealloc_unaligned"] - t["prealloc_aligned"]),
            "output_zero_copy": float(zero_copy(0)[0] and not zero_copy(16)[0])}


measure_bridge.timeout = 300


class Bridge:
    """``tf.numpy_function`` inside a ``tf.function``: per-call cost and copies.

    ``track_us_*``: ``identity`` and ``noop`` are a tiny tensor through ``tf.identity``
    and through a NumPy no-op; ``return_*`` a NumPy function returning a (51 MB float32)
    array: fresh and filled or preallocated, at a 64-byte boundary (``aligned``) or at 16
    bytes as np.empty gives (``unaligned``); ``numpy_copy`` np.copyto into a fresh
    array, what a copy of 51 MB costs NumPy. Best of 5, in turns.
    ``track_overhead_us`` is noop minus identity (best of 15 of those two);
    ``track_boundary_copy_ms`` unaligned minus aligned for the preallocated array (NumPy
    does nothing there, so the difference is TensorFlow's copy);
    ``track_output_zero_copy`` is 1 when TF keeps the aligned array's own buffer.
    """

    timeout = 300

    setup_cache = staticmethod(measure_bridge)

    def setup(self, results):
        if "skip" in results:
            raise NotImplementedError(results["skip"])
        self.results = results

    def _us(self, call):
        return self.results["us"][call]

    def track_us_identity(self, results):
        return self._us("identity")

    def track_us_noop(self, results):
        return self._us("noop")

    def track_us_return_fresh_aligned(self, results):
        return self._us("fresh_aligned")

    def track_us_return_fresh_unaligned(self, results):
        return self._us("fresh_unaligned")

    def track_us_return_prealloc_aligned(self, results):
        return self._us("prealloc_aligned")

    def track_us_return_prealloc_unaligned(self, results):
        return self._us("prealloc_unaligned")

    def track_us_numpy_copy(self, results):
        return self._us("numpy_copy")

    def track_overhead_us(self, results):
        return self.results["overhead_us"]

    def track_boundary_copy_ms(self, results):
        return self.results["boundary_copy_ms"]

    def track_output_zero_copy(self, results):
        return self.results["output_zero_copy"]

    track_us_identity.unit = "us"
    track_us_noop.unit = "us"
    track_us_return_fresh_aligned.unit = "us"
    track_us_return_fresh_unaligned.unit = "us"
    track_us_return_prealloc_aligned.unit = "us"
    track_us_return_prealloc_unaligned.unit = "us"
    track_us_numpy_copy.unit = "us"
    track_overhead_us.unit = "us"
    track_boundary_copy_ms.unit = "ms"
    track_output_zero_copy.unit = "bool"
