"""Inference right after a convolution: which BN op costs least there.

The Keras layer's inference runs TensorFlow's ``FusedBatchNormV3`` where grappler folds
it into the convolution before it, numbabn's op elsewhere
(``keras_layer._bridge._fuses_into_convolution``). This report is the measurement behind
that rule: a 1x1 ``Conv2D`` or a 3x3 ``DepthwiseConv2D`` (with and without its bias)
then BN inference in one ``tf.function``, for

* ``stock``: ``keras.layers.BatchNormalization``;
* ``numbabn``: ``keras_layer.BatchNormalization`` (the rule decides);
* ``op``: the same layer with numbabn's op forced;
* ``fused``: ``FusedBatchNormV3`` in a Keras layer (`_model_common.fused_bn_class`);
* ``conv``: the convolution alone;

timed in turns (median of rounds of 20 calls), outputs checked against stock first. The
BN cost is each variant's time minus ``conv``'s.

Usage: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/conv_bn_report.py [--rounds 15]``
"""

import argparse
import os
import statistics
import sys
import time
from unittest import mock

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks._common import markdown_table  # noqa: E402
from benchmarks._model_common import fused_bn_class  # noqa: E402

SHAPES = ((32, 16, 16, 256), (32, 32, 32, 64))
VARIANTS = ("stock", "numbabn", "op", "fused", "conv")


def build(shape, use_bias, depthwise=False):
    """``{variant: tf.function}`` of conv -> BN(training=False), the same weights."""
    import keras
    import tensorflow as tf

    import keras_layer
    from keras_layer import _bridge

    rng = np.random.default_rng(0)
    c = shape[-1]
    x = tf.constant(rng.standard_normal(shape, np.float32))
    conv = (keras.layers.DepthwiseConv2D(3, padding="same", use_bias=use_bias) if depthwise
            else keras.layers.Conv2D(c, 1, use_bias=use_bias))
    conv.build(shape)
    layers = {"stock": keras.layers.BatchNormalization(),
              "numbabn": keras_layer.BatchNormalization(),
              "op": keras_layer.BatchNormalization(),
              "fused": fused_bn_class()()}
    weights = [rng.uniform(0.5, 1.5, c).astype(np.float32) for _ in range(4)]
    for layer in layers.values():
        layer.build(shape)
        layer.set_weights(weights)
    fns = {}
    for name, layer in layers.items():
        fn = tf.function(lambda layer=layer: layer(conv(x), training=False))
        if name == "op":  # traced now, with the rule saying "not fused"
            with mock.patch.object(_bridge, "_fuses_into_convolution", lambda *a: False):
                fn.get_concrete_function()
        fns[name] = fn
    fns["conv"] = tf.function(lambda: conv(x))
    return fns


def measure(fns, rounds, calls=20):
    want = fns["stock"]().numpy()
    for name in ("numbabn", "op", "fused"):
        got = fns[name]().numpy()
        err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
        if err > 1e-5:
            raise AssertionError(f"{name} differs from stock by {err:.2e} (scaled)")
    samples = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - t0) / calls)
    return {k: statistics.median(v) * 1e3 for k, v in samples.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    rows = []
    for depthwise in (False, True):
        for shape in SHAPES:
            for use_bias in (False, True):
                ms = measure(build(shape, use_bias, depthwise), args.rounds)
                cost = {k: ms[k] - ms["conv"] for k in VARIANTS[:-1]}
                rows.append([str(shape), "depthwise 3x3" if depthwise else "1x1",
                             "yes" if use_bias else "no", f"{ms['conv']:.2f}",
                             *(f"{cost[k]:.2f}" for k in VARIANTS[:-1])])
    print(markdown_table(["input (NHWC)", "convolution", "conv bias", "conv ms",
                          *(f"BN cost {k} ms" for k in VARIANTS[:-1])], rows))


if __name__ == "__main__":
    main()
