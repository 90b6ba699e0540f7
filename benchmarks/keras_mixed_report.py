"""The Keras layer's training step under ``mixed_bfloat16`` (or ``mixed_float16``) against
the stock layer, with the float32 ratio measured in the same run.

Usage (from the repository root)::

    python benchmarks/keras_mixed_report.py [--repeat N] [--policy mixed_bfloat16]

The step is `keras_report`'s: ``tape.gradient`` of ``sum(y * w)`` to x, gamma and beta,
the moving update included, inside a ``tf.function``, on ResNet-50's conv2 activation
(64, 56, 56, 64) NHWC. Under the policy, x and w are in the half dtype (what the layer
before and after hand over in a mixed-precision model) and the variables float32. The
four steps (stock and numbabn, float32 and the policy) are checked against the stock
layer first, then timed in turns (best of N) with the loss plumbing alone (the same step
with ``y = x``, which the last column takes out of both), so a change of load on a
shared machine hits them alike and the speed-ups are comparable.
"""

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before Numba/TF load: see _common
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if not __package__:  # run as a script: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks._common import EPS, best_of_interleaved, check_close, make_inputs  # noqa: E402

SHAPE = (64, 56, 56, 64)
MOMENTUM = 0.99


class _Glue:
    """``y = x``: the step's loss plumbing alone (``y * w``, its sum, their gradient)."""

    def __init__(self, **kwargs):
        self.weights = []

    def build(self, shape):
        import tensorflow as tf

        self.gamma = self.beta = tf.Variable(0.0)

    def set_weights(self, weights):
        pass

    def __call__(self, x, training):
        import tensorflow as tf

        return tf.identity(x)


def train_step(cls, policy, dtype):
    """A traced training step of a fresh ``cls`` layer under ``policy``, and its layer."""
    import keras
    import tensorflow as tf

    inp = make_inputs(SHAPE, 3, np.float32)
    keras.mixed_precision.set_global_policy(policy)
    try:
        layer = cls(axis=-1, momentum=MOMENTUM, epsilon=EPS)
        layer.build(SHAPE)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    layer.set_weights([inp[k].astype(np.float32)
                       for k in ("gamma", "beta", "moving_mean", "moving_var")])
    x = tf.cast(tf.constant(inp["x"]), dtype)
    w = tf.cast(tf.constant(inp["dy"]), dtype)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.cast(y * w, tf.float32))
        return (y, *tape.gradient(loss, [x, layer.gamma, layer.beta]))

    return step, layer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="best of N (default 10)")
    parser.add_argument("--policy", default="mixed_bfloat16",
                        choices=["mixed_bfloat16", "mixed_float16"])
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    import keras_layer
    from keras_layer import _native

    half = args.policy.split("_")[1]
    # the kernels' rounding of the half outputs against the stock's (2 ulp, see
    # tests/test_keras_mixed_precision.py), of the scaled error |a - b| / (1 + |b|)
    tol = {"float32": 1e-3, half: 2 * 2.0 ** -(7 if half == "bfloat16" else 10)}
    steps, layers = {}, {}
    for policy, dtype in (("float32", "float32"), (args.policy, half)):
        for name, cls in (("stock", keras.layers.BatchNormalization),
                          ("numbabn", keras_layer.BatchNormalization), ("glue", _Glue)):
            steps[(dtype, name)], layers[(dtype, name)] = train_step(cls, policy, dtype)
    for dtype in ("float32", half):  # one fresh step each: values against the stock's
        got, want = ([tf.cast(t, tf.float64).numpy() for t in steps[(dtype, k)]()]
                     for k in ("numbabn", "stock"))
        for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
            # dgamma/dbeta: float32 sums of 200k products in the stock's kernels
            check_close(f"{dtype} {what}", a, b, tol[dtype] if what in ("y", "dx") else 1e-3)
        steps[(dtype, "glue")]()
        for a, b in zip(layers[(dtype, "numbabn")].weights, layers[(dtype, "stock")].weights):
            check_close(f"{dtype} {a.name}", a.numpy(), b.numpy().astype(np.float64), 1e-3)
    t = best_of_interleaved({k: (lambda f=f: f()) for k, f in steps.items()}, args.repeat)

    print(f"numbabn's bridge: {_native.status()}; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}; {os.cpu_count()} CPUs; best of {args.repeat}, "
          "in turns")
    print()
    print(f"| train step {SHAPE} NHWC | stock ms | numbabn ms | speed-up vs stock "
          "| loss plumbing ms | speed-up without it |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype, label in (("float32", "float32"), (half, args.policy)):
        stock, ours, glue = (t[(dtype, k)] for k in ("stock", "numbabn", "glue"))
        print(f"| {label} | {stock * 1e3:.1f} | {ours * 1e3:.1f} | {stock / ours:.2f} "
              f"| {glue * 1e3:.1f} | {(stock - glue) / (ours - glue):.2f} |")


if __name__ == "__main__":
    main()
