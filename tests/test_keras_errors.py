"""Second-order gradients, bad inputs and backends: a clear error or the stock layer's
behaviour, never silently wrong numbers or an obscure crash."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads


import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

from keras_helpers import GRAD_TOL, OUT_TOL, assert_close  # noqa: E402



def second_order(layer, x, w, training, mode):
    """d/d[x, gamma] of ||d(sum(y * w))/dx||^2: a gradient penalty, as in WGAN-GP."""

    def fn(x):
        with tf.GradientTape(persistent=True) as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = layer(x, training=training)
                loss = tf.reduce_sum(y * w)
            g = inner.gradient(loss, x)
            penalty = tf.reduce_sum(g * g)
        return outer.gradient(penalty, [x, layer.gamma])

    return (tf.function(fn) if mode == "function" else fn)(x)


@pytest.mark.parametrize("mode", ["eager", "function"])
@pytest.mark.parametrize("training", [True, False])
def test_second_order_gradients_raise_or_match_stock(training, mode):
    shape = (6, 4)
    ours, stock = kh.make_pair(shape, momentum=0.0)
    x, w = kh.data(shape, 90)
    x, w = tf.constant(x), tf.constant(w)
    expected = second_order(stock, x, w, training, mode)
    # In inference mode the penalty does not depend on x (None from the stock layer:
    # unconnected, i.e. zero) but does on gamma; in training mode it depends on both.
    assert expected[1] is not None and np.max(np.abs(expected[1].numpy())) > 1e-2
    assert (expected[0] is not None) == training
    try:
        got = second_order(ours, x, w, training, mode)
    except NotImplementedError as e:
        assert "second-order" in str(e)
        return
    for name, g, e in zip(["d2/dx", "d2/dgamma"], got, expected):
        if e is None:
            assert g is None or np.all(g.numpy() == 0.0), name
            continue
        assert g is not None, (
            f"{name}: keras_layer gave None (silently no gradient) where the stock layer "
            "gives a value; it must raise NotImplementedError or compute it")
        # float32 second derivatives of a float32 first derivative
        assert_close(g, e, 10 * GRAD_TOL, name)


@pytest.mark.parametrize("bad_shape", [(4, 5, 3), (4, 5, 6, 7, 3)], ids=["rank3", "rank5"])
def test_wrong_rank_after_build_raises_input_spec_error(bad_shape):
    ours, stock = kh.make_pair((4, 5, 6, 3))
    x = np.zeros(bad_shape, np.float32)
    with pytest.raises(ValueError) as ours_err:
        ours(x)
    with pytest.raises(ValueError) as stock_err:
        stock(x)
    assert f"expected ndim=4, found ndim={len(bad_shape)}" in str(ours_err.value)
    assert f"expected ndim=4, found ndim={len(bad_shape)}" in str(stock_err.value)


def test_wrong_channel_count_after_build_raises():
    ours, _ = kh.make_pair((4, 5, 6, 3))
    with pytest.raises(ValueError, match="expected axis -1 of input shape to have value 3"):
        ours(np.zeros((4, 5, 6, 2), np.float32))


def _error(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we compare the types
        return e
    return None


@pytest.mark.parametrize("axis", [4, -5, 7])
@pytest.mark.parametrize("how", ["build", "call", "functional"])
def test_axis_out_of_range_errors(axis, how):
    """The stock layer: an IndexError from its build; ours: a ValueError that names the
    axis and the inputs' shape (tests/test_keras_dropin.py checks the message)."""
    shape = (2, 3, 4, 5)

    def attempt(cls):
        layer = cls(axis=axis)
        if how == "build":
            return lambda: layer.build(shape)
        if how == "call":
            return lambda: layer(np.zeros(shape, np.float32))
        return lambda: layer(keras.Input(shape[1:]))

    ours, stock = _error(attempt(kh.OURS)), _error(attempt(kh.STOCK))
    assert isinstance(stock, (ValueError, IndexError)), stock
    assert isinstance(ours, ValueError), ours
    assert "out of range" in str(ours), ours


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("input_dtype", ["int32", "int64", "float64"])
def test_non_float32_inputs_behave_like_stock(input_dtype, training):
    """Keras does not cast integer inputs; the stock layer computes in float32 on them."""
    shape = (12, 3)
    ours, stock = kh.make_pair(shape, momentum=0.5)
    x = (np.random.default_rng(0).integers(-20, 20, shape)).astype(input_dtype)
    y_stock = stock(x, training=training)
    y_ours = ours(x, training=training)
    assert y_ours.dtype == y_stock.dtype == "float32"
    assert_close(y_ours, y_stock, OUT_TOL, f"{input_dtype} inputs")
    kh.assert_weights_close(ours, stock, OUT_TOL, f"{input_dtype} inputs:")


def test_non_tensorflow_backend_is_a_clear_error_in_process(monkeypatch):
    """Keras reporting another backend: construction fails naming TensorFlow."""
    import keras.src.backend as backend_module
    import keras.src.backend.config as config_module

    for module in (keras.backend, keras.config, backend_module, config_module):
        monkeypatch.setattr(module, "backend", lambda: "jax", raising=False)
    assert keras.backend.backend() == "jax"
    with pytest.raises(ValueError, match="TensorFlow backend"):
        kh.OURS()


@pytest.mark.parametrize("shape", [(0, 3), (0, 4, 4, 3)], ids=["rank2", "rank4"])
def test_empty_batch(shape):
    """Inference on an empty batch (e.g. a detection head with no proposals) returns an
    empty batch, as the stock layer does. Training on one has no statistics: the stock
    layer writes NaN into its moving statistics; ours may refuse clearly instead, but
    must not corrupt them."""
    ours, stock = kh.make_pair((None,) + shape[1:], momentum=0.5)
    x = np.zeros(shape, np.float32)
    y_stock = stock(x, training=False)
    assert tuple(y_stock.shape) == shape
    y_ours = ours(x, training=False)
    assert tuple(y_ours.shape) == shape and y_ours.dtype == y_stock.dtype
    before = ours.get_weights()
    try:
        y = ours(x, training=True)
    except ValueError as e:
        assert "empty" in str(e)
    else:
        assert tuple(y.shape) == shape
    for a, b in zip(before, ours.get_weights()):
        np.testing.assert_array_equal(a, b)
