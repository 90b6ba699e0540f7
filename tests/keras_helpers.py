"""Shared helpers for the keras_layer tests (import this module before TensorFlow).

The oracle is Keras's own ``keras.layers.BatchNormalization`` (``STOCK``), built with
the same weights as ``keras_layer.BatchNormalization`` (``OURS``).

Tolerances (float32 data, |x| <= ~6, at most a few hundred elements per channel):

* ``OUT_TOL`` (outputs and moving statistics): the stock layer computes ``tf.nn.moments``
  in float32 (mean, then mean of squared deviations) and normalizes in float32, so its
  outputs carry a few float32 roundings plus the statistics' reduction error, about
  ``sqrt(N) * eps32 ~ 1e-6`` relative; numbabn accumulates in float64 and rounds once, so
  the difference is the stock's error. 1e-5 of the array's scale leaves a 10x margin.
* ``GRAD_TOL`` (gradients): the stock's autodiff gradient goes through float32 reductions
  of ``dy`` and ``dy * xhat`` over the N elements of a channel and a cancellation in
  ``dy - mean(dy) - xhat * mean(dy * xhat)``; its error grows like ``N * eps32`` in the
  worst case (~3e-5 for N = 500), hence 1e-4 of the array's scale. A wrong formula (a
  missing term, a wrong axis) gives O(1) relative errors.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

import keras_layer  # noqa: E402

OURS = keras_layer.BatchNormalization
STOCK = keras.layers.BatchNormalization

OUT_TOL = 1e-5
GRAD_TOL = 1e-4

# (input shape, channel axis): rank 2; rank 3 channels-last and channels-first; rank 4
# channels-last (NHWC) and channels-first (NCHW); rank 5 both ways. Channel counts
# differ from the other dimensions so a wrong reduction axis cannot go unnoticed.
LAYOUTS = [
    ((40, 5), -1),
    ((4, 6, 5), -1),
    ((4, 5, 6), 1),
    ((4, 5, 6, 3), -1),
    ((4, 3, 5, 6), 1),
    ((2, 3, 4, 5, 3), -1),
    ((2, 3, 3, 4, 5), 1),
    ((16, 1), -1),  # a single channel
    ((1, 4, 5, 3), -1),  # a single sample (statistics over the spatial positions only)
]


def layout_id(layout):
    shape, axis = layout
    return f"rank{len(shape)}-" + "x".join(map(str, shape)) + f"-ax{axis}"


def data(shape, seed, loc=0.5, scale=2.0, dtype=np.float32):
    """Random inputs with a non-zero mean, and random loss weights of the same shape."""
    rng = np.random.default_rng(seed)
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    w = rng.standard_normal(shape).astype(np.float32)
    return x, w


def randomize(layer, seed):
    """Give every weight of a built layer a non-default value (positive where it must be).

    Defaults (gamma = 1, beta = 0, moving mean 0, variance 1) would hide a layer that
    ignores gamma or confuses the moving statistics.
    """
    rng = np.random.default_rng(seed)
    values = []
    for v in layer.weights:
        name = v.name
        shape = tuple(v.shape)
        if name in ("gamma", "moving_variance"):
            values.append(rng.uniform(0.5, 2.0, shape))
        elif name in ("moving_stddev", "renorm_stddev"):
            values.append(rng.uniform(0.7, 1.4, shape))
        else:  # beta, moving_mean, renorm_mean
            values.append(0.5 * rng.standard_normal(shape))
    if getattr(layer, "renorm", False):
        # keep the layer self-consistent: moving_variance == moving_stddev**2 - eps
        names = [v.name for v in layer.weights]
        std = values[names.index("moving_stddev")]
        values[names.index("moving_variance")] = np.maximum(std**2 - layer.epsilon, 0.0)
    layer.set_weights([np.asarray(a, dtype=v.dtype) for a, v in zip(values, layer.weights)])


def make_pair(input_shape, seed=0, random_weights=True, **kwargs):
    """(ours, stock) built for ``input_shape`` with identical weights, ours' copied to stock."""
    keras.utils.set_random_seed(seed)
    ours = OURS(**kwargs)
    stock = STOCK(**kwargs)
    ours.build(input_shape)
    stock.build(input_shape)
    if random_weights:
        randomize(ours, seed + 1)
    stock.set_weights(ours.get_weights())
    return ours, stock


def params(layer):
    """gamma and beta, those the layer has."""
    return [v for v in (layer.gamma, layer.beta) if v is not None]


def make_step(layer, training, mode, mask=None):
    """A function ``(x, w) -> (y, [dx, dgamma?, dbeta?])`` for ``loss = sum(y * w)``.

    ``mode`` is "eager" or "function" (the same computation under ``tf.function``).
    """

    def step(x, w):
        with tf.GradientTape() as tape:
            tape.watch(x)
            for p in params(layer):
                tape.watch(p.value)  # the tf.Variable; also when frozen (trainable=False)
            kwargs = {} if mask is None else {"mask": mask}
            y = layer(x, training=training, **kwargs)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
        return y, tape.gradient(loss, [x, *params(layer)])

    if mode == "function":
        return tf.function(step)
    assert mode == "eager"
    return step


def assert_close(actual, expected, tol, what=""):
    """Elementwise closeness at ``tol`` relative to the expected array's magnitude."""
    assert actual is not None, f"{what}: got None"
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


def assert_weights_close(ours, stock, tol, what=""):
    """Every weight, by name, within ``tol``; the names must match one to one."""
    names = [v.name for v in ours.weights]
    assert names == [v.name for v in stock.weights]
    for name, a, b in zip(names, ours.get_weights(), stock.get_weights()):
        assert_close(a, b, tol, f"{what} {name}")

