"""Where a BN layer's time goes inside a model: a per-call profile, shape by shape.

For every BatchNormalization layer of a Keras application (``weights=None``, the
benchmark's 64x64 inputs, batch 32), the layer's own input shape is timed in one
process, round-robin, best of N:

* ``kernels``: numbabn's NumPy API into preallocated outputs (train = forward and
  backward; inference): what the work costs without any framework;
* ``op``: keras_layer's bridge with the compiled op, in a ``tf.function`` (train: forward
  + gradient; inference), one layer per function;
* ``pyfunc``: the same through the ``tf.numpy_function`` bridge (the fallback);
* ``stock``: ``keras.layers.BatchNormalization``; ``fused``: ``FusedBatchNormV3``;
* ``dispatch``: an empty ``tf.function`` of the same inputs (TensorFlow's call cost).

The sums over the model's layers are printed next to the model-level BN cost that
``model_report.py`` measures (model minus the no-BN bound), so the two views can be
compared: what one call costs alone, and what fifty cost inside a step.

Usage: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/layer_profile.py [--model mobilenetv2]``
"""

import argparse
import collections
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks._common import best_of_interleaved, markdown_table  # noqa: E402
from benchmarks._model_common import MODELS, bn_layers, build_base  # noqa: E402

KINDS = ("kernels", "op", "pyfunc", "stock", "fused", "dispatch")


def bn_input_shapes(model, batch):
    """{(shape, axis): how many BN layers of ``model`` see it}."""
    shapes = collections.Counter()
    for layer in bn_layers(model):
        shape = (batch,) + tuple(layer.input.shape[1:])
        shapes[(shape, layer.axis % len(shape))] += 1
    return shapes


def _fns(shape, axis):
    """{(kind, op): callable} for one input shape: see the module docstring."""
    import keras
    import tensorflow as tf

    import numbabn as nbn
    from benchmarks._model_common import fused_bn_class
    from keras_layer import _bridge, _native

    rng = np.random.default_rng(0)
    c = shape[axis]
    x_np = rng.standard_normal(shape).astype(np.float32)
    dy_np = rng.standard_normal(shape).astype(np.float32)
    x, dy = tf.constant(x_np), tf.constant(dy_np)
    gamma, beta = tf.ones(c), tf.zeros(c)
    moving = (tf.zeros(c), tf.ones(c))
    fns = {}

    def bridge_fns(kind):
        @tf.function
        def train(x, dy):
            with tf.GradientTape() as tape:
                tape.watch([x, gamma, beta])
                y, _, _ = _bridge.train(x, gamma, beta, axis, 1e-3)
            return tape.gradient(y, [x, gamma, beta], output_gradients=dy)

        @tf.function
        def inference(x):
            return _bridge.inference(x, gamma, beta, *moving, axis, 1e-3)

        ops = _native.load()
        if kind == "pyfunc":
            _native._state["op"] = None
        train.get_concrete_function(x, dy)  # trace now, with this bridge
        inference.get_concrete_function(x)
        _native._state["op"] = ops
        fns[(kind, "train")] = lambda: train(x, dy)
        fns[(kind, "inference")] = lambda: inference(x)

    bridge_fns("op")
    bridge_fns("pyfunc")

    for kind, cls in (("stock", keras.layers.BatchNormalization), ("fused", fused_bn_class())):
        layer = cls(axis=axis)
        layer.build(shape)

        @tf.function
        def train(x, dy, layer=layer):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=True)
            return tape.gradient(y, [x] + layer.trainable_weights, output_gradients=dy)

        @tf.function
        def inference(x, layer=layer):
            return layer(x, training=False)

        fns[(kind, "train")] = lambda train=train: train(x, dy)
        fns[(kind, "inference")] = lambda inference=inference: inference(x)

    g64, b64 = np.ones(c), np.zeros(c)
    y_np, dx_np = np.empty_like(x_np), np.empty_like(x_np)

    def kernels_train():
        _, stats = nbn.batch_norm_train(x_np, g64, b64, axis=axis, out=y_np)
        nbn.batch_norm_backward(dy_np, x_np, g64, stats, axis=axis, out=dx_np)

    fns[("kernels", "train")] = kernels_train
    fns[("kernels", "inference")] = lambda: nbn.batch_norm_inference(
        x_np, g64, b64, np.zeros(c), np.ones(c), axis=axis, out=y_np)

    empty_train = tf.function(lambda x, dy: (x, dy))
    empty_inference = tf.function(lambda x: x)
    fns[("dispatch", "train")] = lambda: empty_train(x, dy)
    fns[("dispatch", "inference")] = lambda: empty_inference(x)
    return fns


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="mobilenetv2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)

    base = build_base(args.model, args.size, 10, batch=args.batch)
    shapes = bn_input_shapes(base, args.batch)
    header = ["input shape (axis)", "layers"] + [f"{k} {op} us" for op in ("train", "inference")
                                                for k in KINDS]
    rows, totals = [], collections.Counter()
    for (shape, axis), count in sorted(shapes.items(), key=lambda kv: -np.prod(kv[0][0])):
        t = best_of_interleaved(_fns(shape, axis), args.repeat)
        rows.append([f"{shape} ({axis})", str(count)] + [f"{t[(k, op)] * 1e6:.0f}"
                                                    for op in ("train", "inference")
                                                    for k in KINDS])
        for key, seconds in t.items():
            totals[key] += count * seconds
    rows.append(["**sum over the model's layers, ms**", str(sum(shapes.values()))]
                + [f"{totals[(k, op)] * 1e3:.1f}" for op in ("train", "inference")
                   for k in KINDS])
    print(f"# Per-call profile of the BN layers of {MODELS[args.model]} "
          f"({args.size}x{args.size}, batch {args.batch})\n")
    print(markdown_table(header, rows))
    print("\nkernels: numbabn's NumPy API, out= given; op / pyfunc: keras_layer's bridge with "
          "the compiled op / tf.numpy_function, one layer in a tf.function; dispatch: an "
          "empty tf.function of the same tensors. Best of "
          f"{args.repeat} in turns.")


if __name__ == "__main__":
    main()
