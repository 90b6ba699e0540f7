"""Mixed precision: float32 variables, half-precision outputs, values as the stock layer's."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

from keras_helpers import GRAD_TOL, OUT_TOL, assert_close  # noqa: E402

# Half-precision tolerance. Both layers read the same half inputs (and half upstream
# gradients) exactly: the stock layer casts them to float32, ours reads them in the
# kernels (the compiled op on float16/bfloat16 tensors). The stock computes in float32
# (relative error ~1e-6 for these sizes, far below a half ulp), ours in float64; each
# rounds its result once to half, within half an ulp of the exact value, so the two are
# at most 1 ulp apart, plus the rare case where the stock's float32 error moves a value
# across a rounding boundary. 2 ulp of the output's scale (|y| ~ 1) bounds that: 2 * 2**-10
# relative for float16 (10-bit mantissa), 2 * 2**-7 for bfloat16 (7-bit mantissa), with the
# same amount absolute for values near zero. dgamma/dbeta (float32, sums over the same
# half values) and the moving statistics (float32 variables) keep the float32 tolerances.
HALF = {"mixed_float16": ("float16", 2 * 2.0**-10), "mixed_bfloat16": ("bfloat16", 2 * 2.0**-7)}


@pytest.fixture(params=list(HALF))
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    try:
        yield request.param
    finally:
        keras.mixed_precision.set_global_policy("float32")


def assert_half_close(actual, expected, ulp2, what):
    actual = np.asarray(tf.cast(actual, tf.float32), dtype=np.float64)
    expected = np.asarray(tf.cast(expected, tf.float32), dtype=np.float64)
    np.testing.assert_allclose(actual, expected, rtol=ulp2, atol=ulp2, err_msg=what)


VARIANTS = {
    "dense": (((40, 6), -1), {}),
    "nhwc": (((8, 5, 4, 3), -1), {}),
    "nchw": (((8, 3, 4, 5), 1), {}),
    "renorm_nhwc": (((8, 5, 4, 3), -1), dict(renorm=True, renorm_momentum=0.5,
                                             renorm_clipping={"rmax": 1.5, "dmax": 0.5})),
}


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_mixed_precision_matches_stock(policy, variant, mode):
    half, ulp2 = HALF[policy]
    (shape, axis), kwargs = VARIANTS[variant]
    ours, stock = kh.make_pair(shape, axis=axis, momentum=0.6, **kwargs)
    for layer in (ours, stock):
        assert layer.compute_dtype == half
        assert layer.variable_dtype == "float32"
        assert all(v.dtype == "float32" for v in layer.weights)
    for i, training in enumerate((True, True, False)):
        steps = [kh.make_step(L, training, mode) for L in (ours, stock)]
        x, w = kh.data(shape, 50 + i)
        x = tf.cast(x, half)  # half inputs: the gradient to x is half as well
        (y_o, g_o), (y_s, g_s) = (step(x, tf.constant(w)) for step in steps)
        assert y_o.dtype == y_s.dtype == half
        assert_half_close(y_o, y_s, ulp2, f"outputs, training={training}")
        assert g_o[0].dtype == g_s[0].dtype == half
        assert_half_close(g_o[0], g_s[0], ulp2, f"dx, training={training}")
        for k, (a, b) in enumerate(zip(g_o[1:], g_s[1:])):
            assert a.dtype == b.dtype == "float32"
            # float32 sums over the same half inputs and upstream gradients
            assert_close(a, b, GRAD_TOL, f"dgamma/dbeta {k}, training={training}")
        for v in ours.weights:
            assert v.dtype == "float32"
        # the statistics of the same half inputs, accumulated in float32 or better
        kh.assert_weights_close(ours, stock, OUT_TOL, f"training={training}:")


def test_mixed_precision_fit_matches_stock(policy):
    """fit() under the policy (a LossScaleOptimizer for float16) gives the stock's losses."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((96, 6)).astype(np.float32) * 3 + 1
    y = (x[:, :1] - x[:, 1:2] > 0).astype(np.float32)

    def model(bn):
        return keras.Sequential([keras.Input((6,)), keras.layers.Dense(8), bn(momentum=0.8),
                                 keras.layers.ReLU(),
                                 keras.layers.Dense(1, activation="sigmoid", dtype="float32")])

    keras.utils.set_random_seed(0)
    ours, stock = model(kh.OURS), model(kh.STOCK)
    stock.set_weights(ours.get_weights())
    losses = []
    for m in (ours, stock):
        m.compile(optimizer=keras.optimizers.SGD(0.1), loss="binary_crossentropy",
                  jit_compile=False)
        hist = m.fit(x, y, batch_size=32, epochs=2, shuffle=False, verbose=0)
        losses.append(hist.history["loss"])
        assert m.layers[1].moving_mean.dtype == "float32"
        assert m.predict(x[:5], verbose=0).dtype == np.float32
    # half-precision activations through a few SGD steps: agreement to well under 1%
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-2)
    assert np.all(np.isfinite(losses[0]))


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_precision_layer_matches_stock(half):
    """dtype="float16"/"bfloat16" (not mixed): variables, computation interface and
    outputs in half precision; training then inference as the stock layer."""
    ulp2 = {"float16": 2 * 2.0**-10, "bfloat16": 2 * 2.0**-7}[half]
    shape = (8, 5, 3)
    ours, stock = kh.make_pair(shape, dtype=half, momentum=0.5)
    assert all(v.dtype == half for v in ours.weights)
    for i, training in enumerate((True, True, False)):
        x, w = kh.data(shape, 120 + i)
        x = tf.cast(x, half)
        (y_o, g_o), (y_s, g_s) = (kh.make_step(L, training, "eager")(x, tf.constant(w))
                                  for L in (ours, stock))
        assert y_o.dtype == y_s.dtype == half
        assert_half_close(y_o, y_s, ulp2, f"outputs, training={training}")
        for k, (a, b) in enumerate(zip(g_o, g_s)):
            assert a.dtype == b.dtype == half
            scale = max(1.0, float(np.max(np.abs(tf.cast(b, tf.float32).numpy()))))
            assert_half_close(a, b, ulp2 * scale, f"gradient {k}, training={training}")
        for vo, vs in zip(ours.weights, stock.weights):
            # the stock averages in float32 and rounds once; a rounding or two apart
            assert_half_close(vo.value, vs.value, ulp2, f"{vo.name}, training={training}")
        stock.set_weights(ours.get_weights())  # compare each step, not the drift


def _graph_of(layer, x, dy, training):
    """The traced step: forward and backward in training; the forward in inference (its
    rarely used gradient is TensorFlow arithmetic in float32, see _bridge.inference)."""
    @tf.function
    def step(x, dy):
        if not training:
            return layer(x, training=False)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return y, tape.gradient(y, [x] + layer.trainable_weights, output_gradients=dy)

    return step.get_concrete_function(x, dy).graph


@pytest.mark.parametrize("training", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("shape,axis", [((8, 5, 4, 3), -1), ((8, 3, 4, 5), 1), ((40, 6), -1)],
                         ids=["nhwc", "nchw", "dense"])
def test_half_activations_reach_the_op_uncast(policy, shape, axis, training):
    """Under mixed_float16 / mixed_bfloat16 the compiled op takes the half activations and
    upstream gradients as they are: no Cast op to or from the half dtype in the traced
    step (forward, and backward in training), and the op's T is the half dtype."""
    from keras_layer import _native

    assert _native.load() is not None, _native.status()
    half, _ = HALF[policy]
    layer = kh.OURS(axis=axis)
    layer.build(shape)
    x = tf.cast(tf.random.normal(shape), half)
    graph = _graph_of(layer, x, tf.ones_like(x), training)
    numbabn = [op for op in graph.get_operations() if op.type.startswith("Numbabn")]
    expected = {"NumbabnTrain", "NumbabnTrainGrad"} if training else {"NumbabnInference"}
    assert {op.type for op in numbabn} == expected
    assert all(op.get_attr("T") == tf.as_dtype(half) for op in numbabn)
    assert not [op for op in graph.get_operations() if op.type.startswith("PyFunc")]
    casts = [op for op in graph.get_operations() if op.type == "Cast"
             and tf.as_dtype(half) in {op.inputs[0].dtype, op.outputs[0].dtype}]
    assert not casts, [(op.name, op.inputs[0].dtype, op.outputs[0].dtype) for op in casts]
