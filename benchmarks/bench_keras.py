"""asv benchmarks of the Keras layer (``keras_layer.BatchNormalization``).

* `KerasLayer`: one training step inside a ``tf.function`` (forward with batch
  statistics, moving-average update, backward to x, gamma and beta through
  ``tape.gradient`` of ``sum(y * w)``), inference inside a ``tf.function``, and an eager
  training-mode call (forward + moving update, no ``tf.function``), for the stock Keras 3
  layer, ours, and TF's fused op (``FusedBatchNormV3`` + its gradient, Keras's moving
  update), plus the speed-up ratios. Setup checks that all three agree with the stock
  layer first.
* `Bridge`: what ``tf.numpy_function`` itself costs: per call on a tiny tensor, and at
  51 MB whether TensorFlow copies the returned array (it does unless 64-byte aligned).

Helpers live in ``_keras_common.py`` (shared with ``keras_report.py``).
"""

import os

# Before Numba or TensorFlow load (see _common): spinning OpenMP threads left by one
# library's kernel slow the other library's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ._common import best_of_interleaved  # noqa: E402
from ._keras_common import (  # noqa: E402
    KERAS_CASES, bridge_fns, bridge_overhead, build_fns, check_agreement, zero_copy,
)


def _skip_without_tensorflow():
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as exc:
        raise NotImplementedError(f"tensorflow/keras not importable: {exc}") from None


class KerasLayer:
    """Training step and inference: stock Keras layer vs numbabn's vs TF's fused op.

    ``track_speedup_*`` are stock (or fused) time / numbabn time, each the best of 10,
    measured in turns in the same process.
    """

    params = [list(KERAS_CASES)]
    param_names = ["case"]
    timeout = 300

    def setup(self, case):
        _skip_without_tensorflow()
        self.fns = build_fns(*KERAS_CASES[case])
        # Raises before anything is timed if a layer is wrong; also traces every
        # tf.function, so no timed call includes tracing.
        check_agreement(self.fns)

    def time_train_stock(self, case):
        self.fns["stock"]["train"]()

    def time_train_numbabn(self, case):
        self.fns["numbabn"]["train"]()

    def time_train_fused(self, case):
        self.fns["fused"]["train"]()

    def time_inference_stock(self, case):
        self.fns["stock"]["inference"]()

    def time_inference_numbabn(self, case):
        self.fns["numbabn"]["inference"]()

    def time_inference_fused(self, case):
        self.fns["fused"]["inference"]()

    def time_eager_stock(self, case):
        self.fns["stock"]["eager"]()

    def time_eager_numbabn(self, case):
        self.fns["numbabn"]["eager"]()

    def time_eager_fused(self, case):
        self.fns["fused"]["eager"]()

    def _speedup(self, other, op):
        t = best_of_interleaved({k: self.fns[k][op] for k in (other, "numbabn")})
        return t[other] / t["numbabn"]

    def track_speedup_vs_stock_train(self, case):
        return self._speedup("stock", "train")

    def track_speedup_vs_fused_train(self, case):
        return self._speedup("fused", "train")

    def track_speedup_vs_stock_inference(self, case):
        return self._speedup("stock", "inference")

    def track_speedup_vs_fused_inference(self, case):
        return self._speedup("fused", "inference")

    def track_speedup_vs_stock_eager(self, case):
        return self._speedup("stock", "eager")

    def track_speedup_vs_fused_eager(self, case):
        return self._speedup("fused", "eager")

    track_speedup_vs_stock_train.unit = "x"
    track_speedup_vs_fused_train.unit = "x"
    track_speedup_vs_stock_inference.unit = "x"
    track_speedup_vs_fused_inference.unit = "x"
    track_speedup_vs_stock_eager.unit = "x"
    track_speedup_vs_fused_eager.unit = "x"


class Bridge:
    """``tf.numpy_function`` inside a ``tf.function``: per-call cost and copies.

    ``noop`` vs ``identity``: a tiny tensor through a NumPy no-op vs ``tf.identity``.
    ``return_*``: a NumPy function returning a (51 MB float32) array: fresh and filled
    or preallocated, at a 64-byte boundary (``aligned``) or at 16 bytes as np.empty gives
    (``unaligned``). ``track_boundary_copy_ms`` is unaligned minus aligned for the
    preallocated array (NumPy does nothing there, so the difference is TensorFlow's copy);
    ``track_output_zero_copy`` is 1 when TF keeps the aligned array's own buffer.
    """

    timeout = 300

    def setup(self):
        _skip_without_tensorflow()
        self.fns = bridge_fns()
        for fn in self.fns.values():  # trace each tf.function now, not in a timed call
            fn()

    def time_identity(self):
        self.fns["identity"]()

    def time_noop(self):
        self.fns["noop"]()

    def time_return_fresh_aligned(self):
        self.fns["fresh_aligned"]()

    def time_return_fresh_unaligned(self):
        self.fns["fresh_unaligned"]()

    def time_return_prealloc_aligned(self):
        self.fns["prealloc_aligned"]()

    def time_return_prealloc_unaligned(self):
        self.fns["prealloc_unaligned"]()

    def time_numpy_copy(self):
        """np.copyto into a fresh array: what a copy of 51 MB costs NumPy."""
        self.fns["numpy_copy"]()

    def track_overhead_us(self):
        return 1e6 * bridge_overhead()

    def track_boundary_copy_ms(self):
        t = best_of_interleaved({k: self.fns[k] for k in ("prealloc_unaligned",
                                                          "prealloc_aligned")})
        return 1e3 * (t["prealloc_unaligned"] - t["prealloc_aligned"])

    def track_output_zero_copy(self):
        return float(zero_copy(0)[0] and not zero_copy(16)[0])

    track_overhead_us.unit = "us"
    track_boundary_copy_ms.unit = "ms"
    track_output_zero_copy.unit = "bool"
