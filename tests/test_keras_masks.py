"""Masks, with Keras's semantics: a mask over ``inputs.shape[:-1]`` (or anything that
broadcasts to the inputs once expanded at the last axis), whatever the channel axis is.
The stock layer is the oracle for every layout, mask shape and error; a float64 NumPy
reference checks what that semantics is."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

from keras_helpers import GRAD_TOL, OUT_TOL, assert_close  # noqa: E402


def mask_for(shape, seed, keep=0.6, mask_shape=None):
    """A random boolean mask over ``shape[:-1]`` (Keras's mask shape), or ``mask_shape``."""
    rng = np.random.default_rng(seed)
    mask = rng.random(shape[:-1] if mask_shape is None else mask_shape) < keep
    mask.flat[0] = True  # never an empty channel
    return mask


def check_masked_steps(shape, axis, mode, mask_shape=None, seed=60):
    """Two masked training steps and a masked inference step, ours against stock:
    outputs, gradients to x, gamma and beta, and every weight after each step."""
    ours, stock = kh.make_pair(shape, axis=axis, momentum=0.5)
    for step, training in enumerate((True, True, False)):
        x, w = kh.data(shape, seed + step)
        mask = tf.constant(mask_for(shape, seed + 10 + step, mask_shape=mask_shape))
        y_o, g_o = kh.make_step(ours, training, mode, mask=mask)(tf.constant(x), tf.constant(w))
        y_s, g_s = kh.make_step(stock, training, mode, mask=mask)(tf.constant(x), tf.constant(w))
        assert_close(y_o, y_s, OUT_TOL, f"outputs, step {step}")
        for k, (a, b) in enumerate(zip(g_o, g_s)):
            assert_close(a, b, GRAD_TOL, f"gradient {k}, step {step}")
        kh.assert_weights_close(ours, stock, OUT_TOL, f"step {step}:")
    return ours


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("shape", [(4, 7, 3), (3, 4, 5, 3)], ids=["rank3", "rank4"])
def test_mask_channels_last_matches_stock(shape, mode):
    check_masked_steps(shape, -1, mode)
    # the mask mattered: the unmasked statistics give other outputs
    x, _ = kh.data(shape, 60)
    masked, plain = (kh.make_pair(shape, momentum=0.5)[0] for _ in range(2))
    y_masked = masked(x, training=True, mask=mask_for(shape, 70)).numpy()
    assert not np.allclose(y_masked, plain(x, training=True).numpy(), atol=1e-3)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("layout", [((5, 2, 3), 1), ((3, 4, 5, 6), 1), ((3, 4, 5, 6), 2),
                                    ((2, 3, 4, 5, 3), 1)], ids=kh.layout_id)
def test_mask_other_axes_matches_stock(layout, mode):
    """Channels-first inputs take Keras's ``inputs.shape[:-1]`` mask, as the stock layer
    does (it used to demand a mask over every axis but the channel axis)."""
    shape, axis = layout
    check_masked_steps(shape, axis, mode)


def keras_reference(x, mask, axis, gamma, beta, epsilon):
    """Masked batch norm in float64 as Keras defines it: the mask expanded at the LAST
    axis and broadcast to the inputs weights each channel's statistics (``axis``), and
    every position is normalized."""
    x = x.astype(np.float64)
    m = np.broadcast_to(np.expand_dims(mask, -1), x.shape).astype(np.float64)
    red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    bshape = [1] * x.ndim
    bshape[axis] = -1
    count = m.sum(red, keepdims=True)
    mean = (m * x).sum(red, keepdims=True) / count
    var = (m * (x - mean) ** 2).sum(red, keepdims=True) / count
    y = (x - mean) / np.sqrt(var + epsilon) * gamma.reshape(bshape) + beta.reshape(bshape)
    return y, mean.ravel(), var.ravel()


@pytest.mark.parametrize("layout", [((3, 4, 5, 6), 1), ((5, 3, 8), 1), ((5, 3, 8), -1)],
                         ids=kh.layout_id)
def test_mask_semantics_is_keras_expanded_at_last_axis(layout):
    shape, axis = layout
    ours, _ = kh.make_pair(shape, axis=axis, momentum=0.0)
    x, _ = kh.data(shape, 80)
    mask = mask_for(shape, 81)
    gamma, beta = (v.numpy().astype(np.float64) for v in (ours.gamma, ours.beta))
    y = ours(x, training=True, mask=mask)
    y_ref, mean_ref, var_ref = keras_reference(x, mask, axis, gamma, beta, ours.epsilon)
    # float32 masked sums in TensorFlow (and Keras's 1e-7 added to the counts)
    assert_close(y, y_ref, OUT_TOL, "outputs")
    assert_close(ours.moving_mean.numpy(), mean_ref, OUT_TOL, "moving_mean")
    assert_close(ours.moving_variance.numpy(), var_ref, OUT_TOL, "moving_variance")
    # the unmasked reference differs: the mask was honoured
    y_unmasked, _, _ = keras_reference(x, np.ones_like(mask), axis, gamma, beta, ours.epsilon)
    assert not np.allclose(y_ref, y_unmasked, atol=1e-3)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("shape,axis,mask_shape", [
    ((1, 2, 3, 4), -1, (1, 2, 1)),     # Keras's own test: broadcast along the 3rd axis
    ((4, 5, 6, 3), -1, (4, 1, 6)),
    ((4, 5, 6, 3), 1, (1, 5, 6)),
    ((4, 5, 6, 3), 1, (4, 1, 1)),      # whole samples masked out
    ((6, 3), -1, (1,)),
])
def test_broadcastable_masks_match_stock(shape, axis, mask_shape, mode):
    check_masked_steps(shape, axis, mode, mask_shape=mask_shape)


def test_keras_broadcast_example():
    """keras's test_masked_broadcast_normalization, on ours."""
    layer = kh.OURS(axis=-1, momentum=0.0, epsilon=1e-3)
    y = layer(np.ones((1, 2, 3, 4), np.float32), training=True,
              mask=np.ones((1, 2, 1), np.float32))
    np.testing.assert_allclose(y.numpy(), 0.0, atol=1e-6)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 1.0, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.0, atol=1e-6)


def _outcome(layer, x, mask, training, mode):
    """The output, or the exception's type (and message) the call raises."""
    fn = lambda x, mask: layer(x, training=training, mask=mask)  # noqa: E731
    if mode == "function":
        fn = tf.function(fn)
    try:
        return fn(tf.constant(x), tf.constant(mask)).numpy()
    except Exception as e:  # noqa: BLE001 - compared with the stock layer's
        return e


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("shape,axis,mask_shape", [
    ((4, 7, 3), -1, (4, 6)),           # does not broadcast
    ((4, 5, 6, 3), -1, (4, 5)),        # one dimension too few
    ((4, 3, 5, 6), 1, (4, 5, 6)),      # the old channels-first mask: does not broadcast
    ((4, 3, 5, 6), 1, (4, 3, 5, 6)),   # the inputs' rank
    ((4, 3, 5, 6), 1, (4, 3, 5)),      # Keras's shape: accepted
])
def test_mask_errors_and_acceptance_as_stock(shape, axis, mask_shape, training, mode):
    """Whatever the stock layer raises for a mask, ours raises (the same type); whatever
    it accepts, ours accepts with the same outputs. (Keras checks the mask's rank always,
    broadcasts it only for training statistics; inference ignores it.)"""
    ours, stock = kh.make_pair(shape, axis=axis)
    x, _ = kh.data(shape, 0)
    mask = np.ones(mask_shape, dtype=bool)
    mask.flat[1::3] = False
    got = _outcome(ours, x, mask, training, mode)
    expected = _outcome(stock, x, mask, training, mode)
    if isinstance(expected, Exception):
        assert type(got) is type(expected), (got, expected)
        if len(mask_shape) != len(shape) - 1:  # Keras's message, both shapes in it
            for text in ("one dimension less", str(tuple(mask_shape)), str(tuple(shape))):
                assert text in str(got), got
        return
    assert not isinstance(got, Exception), got
    assert_close(got, expected, OUT_TOL, "outputs")
    kh.assert_weights_close(ours, stock, OUT_TOL, "weights:")


def test_masking_layer_mask_propagates():
    """A Masking layer's mask (rank-3 sequences, padded steps) reaches the layer in a
    model, as with the stock layer."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 7, 4)).astype(np.float32) + 1.0
    x[1, 4:] = 0.0
    x[3, 2:] = 0.0

    def model(bn):
        return keras.Sequential([keras.Input((7, 4)), keras.layers.Masking(0.0),
                                 bn(momentum=0.0)])

    ours, stock = model(kh.OURS), model(kh.STOCK)
    assert_close(ours(x, training=True), stock(x, training=True), OUT_TOL, "outputs")
    kh.assert_weights_close(ours.layers[-1], stock.layers[-1], OUT_TOL, "masked statistics:")
    valid = np.any(x != 0.0, axis=-1)
    np.testing.assert_allclose(ours.layers[-1].moving_mean.numpy(), x[valid].mean(0),
                               rtol=1e-5)


@pytest.mark.parametrize("axis", [1, -1])
def test_masking_layer_with_channels_first_axis(axis):
    """The issue's case: ``axis=1`` on (5, 2, 3) inputs behind ``layers.Masking`` gets the
    standard (5, 2) mask; ours used to raise. Training in a model, then inference."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((5, 2, 3)).astype(np.float32) + 2.0
    x[:, 1, :] = 0.0
    x[2, 0, :] = 0.0

    def model(bn):
        return keras.Sequential([keras.Input((2, 3)), keras.layers.Masking(0.0),
                                 bn(axis=axis, momentum=0.0)])

    ours, stock = model(kh.OURS), model(kh.STOCK)
    for training in (True, False):
        assert_close(ours(x, training=training), stock(x, training=training), OUT_TOL,
                     f"outputs, training={training}")
        kh.assert_weights_close(ours.layers[-1], stock.layers[-1], OUT_TOL, "statistics:")


@pytest.mark.parametrize("axis", [1, -1])
def test_embedding_mask_zero_fit_matches_stock(axis):
    """``Embedding(mask_zero=True)`` gives a (batch, steps) mask; a `fit` step uses it."""
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, 20, (8, 6))
    tokens[:, 4:] = 0
    tokens[1, 2:] = 0
    target = rng.standard_normal((8, 6, 4)).astype(np.float32)

    def fitted(bn):
        keras.utils.set_random_seed(1)
        model = keras.Sequential([keras.Input((6,), dtype="int32"),
                                  keras.layers.Embedding(20, 4, mask_zero=True),
                                  bn(axis=axis, momentum=0.5)])
        model.compile("sgd", "mse")
        model.fit(tokens, target, batch_size=8, epochs=2, verbose=0, shuffle=False)
        return model

    ours, stock = fitted(kh.OURS), fitted(kh.STOCK)
    kh.assert_weights_close(ours.layers[-1], stock.layers[-1], OUT_TOL, "after fit:")
    assert_close(ours.predict(tokens, verbose=0), stock.predict(tokens, verbose=0), OUT_TOL,
                 "predict")
