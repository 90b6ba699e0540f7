"""model.fit/evaluate/predict with keras_layer.BatchNormalization against the stock
layer, and XLA: off under jit_compile="auto", a clear error under jit_compile=True."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

BATCH = 100  # 1797 digits: 17 full batches and a partial one of 97


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.images[..., None] / 16.0).astype(np.float32)
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    return x[perm], y[perm]


def cnn(bn):
    # no bias before a BatchNormalization (it cancels it): a bias there gets a gradient
    # that is pure rounding noise, which Adam's normalization turns into lr-sized random
    # steps, making the two runs' moving means drift apart for no interesting reason
    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(8, 3, use_bias=False),
        bn(momentum=0.9),
        keras.layers.ReLU(),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(32, use_bias=False),
        bn(momentum=0.9),
        keras.layers.Dense(10, activation="softmax"),
    ])


def compile_model(model, jit_compile):
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=jit_compile)


def test_fit_evaluate_predict_match_stock(digits):
    x, y = digits
    keras.utils.set_random_seed(0)
    ours, stock = cnn(kh.OURS), cnn(kh.STOCK)
    stock.set_weights(ours.get_weights())
    results = {}
    for name, model in (("ours", ours), ("stock", stock)):
        compile_model(model, "auto" if name == "ours" else False)
        keras.utils.set_random_seed(1)
        hist = model.fit(x, y, batch_size=BATCH, epochs=3, shuffle=False, verbose=0)
        results[name] = dict(
            loss=hist.history["loss"], acc=hist.history["accuracy"][-1],
            evaluate=model.evaluate(x, y, batch_size=BATCH, verbose=0),
            predict=model.predict(x, batch_size=BATCH, verbose=0))
    assert ours.jit_compile is False
    ro, rs = results["ours"], results["stock"]
    # Float32 training is chaotic: rounding differences (ours accumulates in float64,
    # the stock in float32) are amplified step after step, so no bitwise agreement is
    # expected after 54 Adam steps. Here they agree to ~1e-6; 2% still catches a wrong
    # gradient or moving-average update, which changes the trajectory by far more.
    np.testing.assert_allclose(ro["loss"], rs["loss"], rtol=0.02)
    np.testing.assert_allclose(ro["evaluate"], rs["evaluate"], rtol=0.02)
    assert ro["loss"][-1] < 0.6 * ro["loss"][0] and ro["acc"] > 0.8  # it did learn
    # predict() in inference mode (moving statistics), the partial last batch included
    assert ro["predict"].shape == (len(x), 10)
    np.testing.assert_allclose(ro["predict"].sum(1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(ro["predict"], rs["predict"], atol=0.02)
    # evaluate() and predict() agree on the accuracy (the same inference path)
    np.testing.assert_allclose(ro["evaluate"][1], np.mean(ro["predict"].argmax(1) == y),
                               atol=1e-6)
    # the moving statistics trained alike (1e-3: the trajectories' float32 drift)
    for lo, ls in zip(ours.layers, stock.layers):
        if isinstance(lo, keras.layers.BatchNormalization):
            kh.assert_weights_close(lo, ls, 1e-3, lo.name)


def test_train_and_predict_on_batch_with_unknown_batch_size(digits):
    x, y = digits
    keras.utils.set_random_seed(0)
    model = cnn(kh.OURS)
    compile_model(model, "auto")
    for n in (7, 13):  # different batch sizes through the same traced functions
        logs = model.train_on_batch(x[:n], y[:n], return_dict=True)
        assert np.isfinite(logs["loss"])
        assert model.predict_on_batch(x[:n]).shape == (n, 10)


def test_jit_compile_auto_stays_off(digits, monkeypatch):
    """jit_compile="auto" resolves to False for a model with our layer. On a CPU-only
    machine Keras turns XLA off for every model, so pretend there is a GPU: the stock
    model then resolves to True, ours must not."""
    x, y = digits
    fake_gpu = tf.config.PhysicalDevice(name="/physical_device:GPU:0", device_type="GPU")
    real = tf.config.list_physical_devices
    with monkeypatch.context() as m:
        m.setattr(tf.config, "list_physical_devices",
                  lambda device_type=None: real(device_type) + (
                      [fake_gpu] if device_type in (None, "GPU") else []))
        stock, ours = cnn(kh.STOCK), cnn(kh.OURS)
        compile_model(stock, "auto")
        compile_model(ours, "auto")
        assert stock.jit_compile is True  # the test can tell
        assert ours.jit_compile is False
    ours.fit(x[:250], y[:250], batch_size=BATCH, epochs=1, verbose=0)
    assert ours.jit_compile is False
    assert all(L.supports_jit is False for L in ours.layers
               if isinstance(L, keras.layers.BatchNormalization))


def test_jit_compile_true_in_compile_falls_back(digits):
    """compile(jit_compile=True): Keras warns that the model does not support it and
    trains without XLA (the stock model keeps it)."""
    x, y = digits
    ours, stock = cnn(kh.OURS), cnn(kh.STOCK)
    compile_model(stock, True)
    assert stock.jit_compile is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compile_model(ours, True)
    assert any("jit_compile" in str(w.message) for w in caught)
    assert ours.jit_compile is False
    hist = ours.fit(x[:250], y[:250], batch_size=BATCH, epochs=1, verbose=0)
    assert np.isfinite(hist.history["loss"][0])


@pytest.mark.parametrize("training", [True, False])
def test_tf_function_jit_compile_raises_naming_the_layer(training):
    layer = kh.OURS(name="bn_under_xla")
    x, _ = kh.data((6, 4), 0)
    layer.build(x.shape)
    fn = tf.function(lambda t: layer(t, training=training), jit_compile=True)
    with pytest.raises(ValueError, match="bn_under_xla") as info:
        fn(tf.constant(x))
    assert not isinstance(info.value, tf.errors.OpError)  # not an XLA compilation error
    assert "XLA" in str(info.value) or "jit_compile" in str(info.value)
