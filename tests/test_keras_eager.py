"""Eager calls of the layer never run tf.numpy_function.

With the compiled op (keras_layer/_native) eager calls are TensorFlow ops like any
other. Where the tf.numpy_function bridge runs instead (no compiler, NUMBABN_TF_OP=0: the
``numpy_function_bridge`` fixture), ``tf.numpy_function`` executed eagerly would copy
its inputs and outputs (50 of a 65 ms call on a 51 MB tensor), so that bridge runs the
kernels directly on DLPack views there. These tests pin both: no numpy_function eagerly,
the fallback's kernel reading TensorFlow's own buffer and writing the one the returned
tensor holds, and the same results as the stock layer (float32, float16, an empty batch,
second-order requests refused).
"""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import numbabn as nbn  # noqa: E402
from keras_layer import _bridge  # noqa: E402
from test_keras_parity import check_step, train_and_infer  # noqa: E402


@pytest.fixture
def no_eager_numpy_function(monkeypatch):
    """tf.numpy_function fails the test when called outside a graph."""
    real = tf.numpy_function

    def guarded(*args, **kwargs):
        assert not tf.executing_eagerly(), "tf.numpy_function called eagerly"
        return real(*args, **kwargs)

    monkeypatch.setattr(tf, "numpy_function", guarded)


@pytest.mark.usefixtures("no_eager_numpy_function")
@pytest.mark.parametrize("layout", [((40, 5), -1), ((4, 3, 5, 6), 1)], ids=kh.layout_id)
def test_eager_steps_match_stock_without_numpy_function(layout):
    shape, axis = layout
    ours, stock = kh.make_pair(shape, axis=axis, momentum=0.7)
    train_and_infer(ours, stock, shape, "eager")


@pytest.mark.usefixtures("no_eager_numpy_function", "numpy_function_bridge")
def test_fallback_graph_still_uses_numpy_function(monkeypatch):
    calls = []
    real = tf.numpy_function
    monkeypatch.setattr(tf, "numpy_function",
                        lambda *a, **k: calls.append(k.get("name")) or real(*a, **k))
    ours, stock = kh.make_pair((8, 4), momentum=0.7)
    train_and_infer(ours, stock, (8, 4), "function", steps=1)
    assert {"numbabn_train", "numbabn_train_grad", "numbabn_inference"} <= set(calls)


@pytest.mark.usefixtures("no_eager_numpy_function")
def test_eager_float16_and_empty_batch():
    ours, stock = kh.make_pair((4, 5, 6, 3), dtype="float16")
    for training in (True, False):
        steps = [kh.make_step(L, training, "eager") for L in (ours, stock)]
        x, w = kh.data((4, 5, 6, 3), seed=3, dtype=np.float16)
        check_step(*steps, x, w.astype(np.float32), f"float16 training={training}",
                   out_tol=2e-3, grad_tol=2e-2)
    empty = tf.zeros((0, 5, 6, 3), tf.float16)
    assert tuple(ours(empty, training=False).shape) == (0, 5, 6, 3)


@pytest.mark.usefixtures("numpy_function_bridge")
def test_fallback_eager_kernels_use_tensorflows_buffers(monkeypatch):
    """The kernel reads x's own buffer and writes the one y holds: no copies either way."""
    seen = {}

    def spy(name):
        real = getattr(nbn, name)

        def run(a, b, *args, out=None, **kwargs):
            seen[name] = (a.ctypes.data, b.ctypes.data, out.ctypes.data)
            return real(a, b, *args, out=out, **kwargs)
        monkeypatch.setattr(nbn, name, run)

    spy("batch_norm_train")
    spy("batch_norm_backward")
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((64, 8, 8, 16), dtype=np.float32))
    dy = tf.constant(rng.standard_normal((64, 8, 8, 16), dtype=np.float32))
    gamma, beta = tf.ones(16), tf.zeros(16)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y, _, _ = _bridge.train(x, gamma, beta, 3, 1e-3)
    dx = tape.gradient(y, x, output_gradients=dy)

    def address(t):
        return np.from_dlpack(t).ctypes.data

    x_read, _, y_written = seen["batch_norm_train"]
    assert x_read == address(x)
    assert y_written == address(y)
    dy_read, x_read, dx_written = seen["batch_norm_backward"]
    assert (dy_read, x_read) == (address(dy), address(x))
    assert dx_written == address(dx)


def test_eager_second_order_still_refused():
    x = tf.constant(np.random.default_rng(1).standard_normal((32, 4), dtype=np.float32))
    with tf.GradientTape() as outer:
        outer.watch(x)
        with tf.GradientTape() as inner:
            inner.watch(x)
            y, _, _ = _bridge.train(x, None, None, 1, 1e-3)
            loss = tf.reduce_sum(y * y * x)
        dx = inner.gradient(loss, x)
    with pytest.raises(NotImplementedError, match="second-order"):
        outer.gradient(dx, x)
