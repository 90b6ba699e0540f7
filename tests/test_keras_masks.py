"""Masked batch statistics: as the stock layer's for channels-last inputs, as a NumPy
weighted reference for channels-first ones, and a clear error for a wrong mask shape."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

from keras_helpers import GRAD_TOL, OUT_TOL, assert_close  # noqa: E402


def mask_for(shape, axis, seed, keep=0.6):
    """A random boolean mask with the inputs' shape minus the channel axis."""
    rng = np.random.default_rng(seed)
    axis = axis % len(shape)
    mshape = tuple(d for a, d in enumerate(shape) if a != axis)
    mask = rng.random(mshape) < keep
    mask.flat[0] = True  # never an empty channel
    return mask


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("shape", [(4, 7, 3), (3, 4, 5, 3)], ids=["rank3", "rank4"])
def test_mask_channels_last_matches_stock(shape, mode):
    ours, stock = kh.make_pair(shape, momentum=0.5)
    for step, training in enumerate((True, True, False)):
        x, w = kh.data(shape, 60 + step)
        mask = tf.constant(mask_for(shape, -1, 70 + step))
        y_o, g_o = kh.make_step(ours, training, mode, mask=mask)(tf.constant(x), tf.constant(w))
        y_s, g_s = kh.make_step(stock, training, mode, mask=mask)(tf.constant(x), tf.constant(w))
        assert_close(y_o, y_s, OUT_TOL, f"outputs, step {step}")
        for k, (a, b) in enumerate(zip(g_o, g_s)):
            assert_close(a, b, GRAD_TOL, f"gradient {k}, step {step}")
        kh.assert_weights_close(ours, stock, OUT_TOL, f"step {step}:")
    # the mask mattered: the unmasked statistics give other outputs
    x, _ = kh.data(shape, 60)
    masked, plain = (kh.make_pair(shape, momentum=0.5)[0] for _ in range(2))
    y_masked = masked(x, training=True, mask=mask_for(shape, -1, 70)).numpy()
    assert not np.allclose(y_masked, plain(x, training=True).numpy(), atol=1e-3)


def weighted_reference(x, mask, axis, gamma, beta, mean0, var0, momentum, epsilon):
    """Masked batch norm in float64: statistics over the unmasked positions of each
    channel (the mask broadcast along the channel axis); every position normalized."""
    x = x.astype(np.float64)
    m = np.broadcast_to(np.expand_dims(mask, axis), x.shape).astype(np.float64)
    red = tuple(a for a in range(x.ndim) if a != axis)
    bshape = [1] * x.ndim
    bshape[axis] = -1
    count = m.sum(red)
    mean = (m * x).sum(red) / count
    var = (m * (x - mean.reshape(bshape)) ** 2).sum(red) / count
    y = ((x - mean.reshape(bshape)) / np.sqrt(var.reshape(bshape) + epsilon)
         * gamma.reshape(bshape) + beta.reshape(bshape))
    return y, momentum * mean0 + (1 - momentum) * mean, momentum * var0 + (1 - momentum) * var


@pytest.mark.parametrize("layout", [((3, 4, 5, 6), 1), ((5, 3, 8), 1)], ids=kh.layout_id)
def test_mask_channels_first_matches_numpy_reference(layout):
    # (The stock layer expands the mask at the last axis whatever `axis` is, so it is no
    # oracle here: it fails to broadcast, or weighs the wrong elements.)
    shape, axis = layout
    ours, _ = kh.make_pair(shape, axis=axis, momentum=0.3)
    x, _ = kh.data(shape, 80)
    mask = mask_for(shape, axis, 81)
    gamma, beta, mean0, var0 = (v.numpy().astype(np.float64) for v in ours.weights)
    y = ours(x, training=True, mask=mask)
    y_ref, mean_ref, var_ref = weighted_reference(x, mask, axis, gamma, beta, mean0, var0,
                                                  0.3, ours.epsilon)
    # float32 masked sums in TensorFlow (and Keras's 1e-7 added to the counts)
    assert_close(y, y_ref, OUT_TOL, "outputs")
    assert_close(ours.moving_mean.numpy(), mean_ref, OUT_TOL, "moving_mean")
    assert_close(ours.moving_variance.numpy(), var_ref, OUT_TOL, "moving_variance")
    # the unmasked reference differs: the mask was honoured
    y_unmasked, _, _ = weighted_reference(x, np.ones_like(mask), axis, gamma, beta, mean0,
                                          var0, 0.3, ours.epsilon)
    assert not np.allclose(y_ref, y_unmasked, atol=1e-3)


@pytest.mark.parametrize("shape,axis,mask_shape", [
    ((4, 7, 3), -1, (4, 6)),           # wrong length
    ((4, 5, 6, 3), -1, (4, 5)),        # wrong rank
    ((4, 3, 5, 6), 1, (4, 3, 5)),      # channels-last style mask on channels-first inputs
    ((4, 3, 5, 6), 1, (4, 5, 6, 3)),   # the inputs' rank
])
def test_wrong_mask_shape_raises_with_both_shapes(shape, axis, mask_shape):
    ours, _ = kh.make_pair(shape, axis=axis)
    x, _ = kh.data(shape, 0)
    mask = np.ones(mask_shape, dtype=bool)
    with pytest.raises(ValueError) as info:
        ours(x, training=True, mask=mask)
    message = str(info.value)
    assert str(tuple(mask_shape)) in message, message
    assert str(tuple(shape)) in message, message


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
