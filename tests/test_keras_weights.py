"""Weights of keras_layer.BatchNormalization: the stock layer's names, shapes, order and
trainability; set_weights both ways; .weights.h5 files interchangeable with the stock's."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras  # noqa: E402

from keras_helpers import OUT_TOL, assert_close  # noqa: E402

CONFIGS = {
    "defaults": {},
    "center_false": dict(center=False),
    "scale_false": dict(scale=False),
    "no_affine": dict(center=False, scale=False),
    "renorm": dict(renorm=True, renorm_clipping={"rmax": 2.0}),
    "channels_first": dict(axis=1),
    "float64": dict(dtype="float64"),
}


def describe(layer):
    return [(v.name, v.path.split("/", 1)[1], tuple(v.shape), v.dtype, v.trainable)
            for v in layer.weights]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_weights_layout_matches_stock(config):
    shape = (4, 6, 5, 7)
    ours, stock = kh.OURS(**CONFIGS[config]), kh.STOCK(**CONFIGS[config])
    ours.build(shape)
    stock.build(shape)
    assert describe(ours) == describe(stock)
    assert [v.name for v in ours.trainable_weights] == [v.name for v in stock.trainable_weights]
    assert ([v.name for v in ours.non_trainable_weights]
            == [v.name for v in stock.non_trainable_weights])
    if config == "renorm":
        assert [v.name for v in ours.weights][-3:] == [
            "moving_stddev", "renorm_mean", "renorm_stddev"]
    # the initial values too (moving_stddev = sqrt(moving_variance initializer) etc.)
    for a, b in zip(ours.get_weights(), stock.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert isinstance(ours, keras.layers.BatchNormalization)


@pytest.mark.parametrize("config", ["defaults", "no_affine", "renorm"])
def test_set_weights_both_ways(config):
    shape = (6, 5)
    x, _ = kh.data(shape, 1)
    ours, stock = kh.OURS(**CONFIGS[config]), kh.STOCK(**CONFIGS[config])
    ours.build(shape)
    stock.build(shape)
    # stock -> ours
    kh.randomize(stock, 2)
    ours.set_weights(stock.get_weights())
    for a, b in zip(ours.get_weights(), stock.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert_close(ours(x, training=False), stock(x, training=False), OUT_TOL, "stock -> ours")
    # ours -> stock
    kh.randomize(ours, 3)
    stock.set_weights(ours.get_weights())
    for a, b in zip(ours.get_weights(), stock.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert_close(ours(x, training=False), stock(x, training=False), OUT_TOL, "ours -> stock")


def _model(bn):
    """A small functional model with three BatchNormalization layers (one renorm)."""
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    h = bn(name="bn_conv")(h)
    h = keras.layers.Flatten()(h)
    a = bn(name="bn_a", center=False)(keras.layers.Dense(5, name="dense_a")(h))
    b = bn(name="bn_b", renorm=True)(keras.layers.Dense(5, name="dense_b")(h))
    out = keras.layers.Dense(3, name="head")(keras.layers.Concatenate()([a, b]))
    return keras.Model(inputs, out)


@pytest.mark.parametrize("direction", ["stock_to_ours", "ours_to_stock"])
def test_weights_h5_interchangeable(tmp_path, direction):
    classes = {"stock": kh.STOCK, "ours": kh.OURS}
    src_name, dst_name = direction.split("_to_")
    keras.utils.set_random_seed(0)
    src = _model(classes[src_name])
    dst = _model(classes[dst_name])
    x = np.random.default_rng(5).standard_normal((7, 6, 6, 2)).astype(np.float32)
    # give the moving statistics non-initial values on the source model
    for _ in range(3):
        src(x, training=True)
    for layer in src.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert not np.allclose(layer.moving_mean.numpy(), 0.0)
    path = tmp_path / "model.weights.h5"
    src.save_weights(path)
    dst.load_weights(path)
    for va, vb in zip(src.weights, dst.weights):
        assert va.path == vb.path
        np.testing.assert_array_equal(va.numpy(), vb.numpy(), err_msg=va.path)
    assert_close(dst(x, training=False), src(x, training=False), OUT_TOL, "predictions")
