"""numbabn's compiled TensorFlow op (keras_layer/_native): the bridge the layer uses.

It must give bitwise what the tf.numpy_function bridge gives (the same kernels), hand
out buffers only TensorFlow owns (outputs from TensorFlow's allocator; an input's buffer
reused only where nothing else reads it), keep memory bounded over many calls, run
concurrent calls from TensorFlow's thread pools, and fall back to tf.numpy_function with
one note where it cannot be built.
"""

import resource

import numpy as np
import pytest

import keras_helpers as kh  # noqa: F401 - sets TensorFlow's log level first
from helpers import run_python
import tensorflow as tf

import numbabn as nbn
from keras_layer import _bridge, _native

# ((64, 40, 40, 8), 3) is over SERIAL_BELOW; ((4096, 8, 3, 3), 1) has channels-first runs
# shorter than LANES and a batch long enough that the short-run reductions split it into
# other tasks than the planes ones would (the op takes the NumPy API's short-run path)
CASES = [((6, 5), 1), ((4, 5, 6, 3), 3), ((4, 3, 5, 6), 1), ((3, 4, 5, 6, 2), 4),
         ((2, 7, 3, 4), 2), ((64, 40, 40, 8), 3), ((4096, 8, 3, 3), 1)]


def test_the_op_is_built_and_used():
    # make test builds it (Makefile); CI has a compiler, so it must load here
    assert _native.load() is not None, _native.status()
    assert _native.status() == "compiled op"
    x = tf.ones((4, 3))

    @tf.function
    def f(x):
        return _bridge.train(x, None, None, 1, 1e-3)[0]

    graph_ops = {op.type for op in f.get_concrete_function(x).graph.get_operations()}
    assert "NumbabnTrain" in graph_ops and "PyFunc" not in graph_ops


def _run(x, gamma, beta, dy, axis, graph):
    def step(x, gamma, beta, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, mean, var = _bridge.train(x, gamma if gamma.shape[0] else None,
                                         beta if beta.shape[0] else None, axis, 1e-3)
            loss = tf.reduce_sum(y * dy)
        grads = tape.gradient(loss, [x, gamma, beta])
        y_inf = _bridge.inference(x, gamma if gamma.shape[0] else None,
                                  beta if beta.shape[0] else None, tf.cast(mean, gamma.dtype),
                                  tf.cast(var, gamma.dtype) - 0.5, axis, 1e-3)
        return [y, mean, var, y_inf] + [g for g in grads if g is not None]

    fn = tf.function(step) if graph else step
    return [t.numpy() for t in fn(x, gamma, beta, dy)]


# every case in float32 with gamma and beta, eagerly and in tf.function; float64 and
# no gamma/beta in tf.function (the same C++ path as eager calls)
VARIANTS = ([("float32", True, True), ("float32", False, True), ("float64", True, True),
             ("float32", True, False)])


@pytest.mark.parametrize("shape,axis", CASES, ids=[str(c) for c in CASES])
@pytest.mark.parametrize("dtype,graph,affine", VARIANTS,
                         ids=["-".join(map(str, v)) for v in VARIANTS])
def test_op_equals_numpy_function_bridge_bitwise(shape, axis, dtype, graph, affine,
                                                 request):
    rng = np.random.default_rng(3)
    channels = shape[axis]
    x = tf.constant((1e3 + rng.standard_normal(shape)).astype(dtype))
    dy = tf.constant(rng.standard_normal(shape).astype(dtype))
    n = channels if affine else 0
    gamma = tf.constant(rng.uniform(0.5, 2, n).astype("float32"))
    beta = tf.constant(rng.standard_normal(n).astype("float32"))
    ours = _run(x, gamma, beta, dy, axis, graph)
    request.getfixturevalue("numpy_function_bridge")
    ref = _run(x, gamma, beta, dy, axis, graph)
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    # a negative moving variance (y_inf: var - 0.5) gives NaN in its channel, as stock
    assert np.isnan(ours[3]).any() == bool((ours[2] - 0.5 + 1e-3 < 0).any())


def test_outputs_are_never_overwritten_while_tensorflow_holds_them():
    """Outputs of one step stay intact while later steps run (TensorFlow owns them), and
    an input whose buffer the op could reuse is not changed while something reads it."""
    rng = np.random.default_rng(5)
    # 512 KiB each: outputs come from the op's buffer pool (from 256 KiB up)
    xs = [tf.constant(rng.standard_normal((16, 32, 32, 8)).astype("float32")) for _ in range(4)]

    @tf.function
    def step(x):
        h = x * 2.0  # a fresh intermediate: the op may take over its buffer...
        y, _, _ = _bridge.train(h, None, None, 3, 1e-3)
        y_inf = _bridge.inference(h, None, None, tf.zeros(8), tf.ones(8), 3, 1e-3)
        return y, y_inf, h  # ...unless something else still reads it, as here

    held = [step(x) for x in xs]
    for x, (y, y_inf, h) in zip(xs, held):
        np.testing.assert_array_equal(h.numpy(), x.numpy() * 2.0)
        a = x.numpy().astype(np.float64) * 2.0
        expect = (a - a.mean((0, 1, 2))) / np.sqrt(a.var((0, 1, 2)) + 1e-3)
        np.testing.assert_allclose(y.numpy(), expect, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(y_inf.numpy(), a / np.sqrt(1 + 1e-3), rtol=1e-6)


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def _pool_cached_mb():
    import ctypes

    lib = ctypes.CDLL(str(_native.library_path()))
    lib.numbabn_pool_cached_bytes.restype = ctypes.c_int64
    return lib.numbabn_pool_cached_bytes() / 2 ** 20


@pytest.mark.parametrize("shape,calls", [((32, 8, 8, 16), 10_000), ((32, 32, 32, 16), 1000)],
                         ids=["TensorFlow's allocator", "pooled"])
def test_memory_stays_bounded_over_many_calls(shape, calls):
    assert _native.load() is not None
    x = tf.constant(np.random.default_rng(6).standard_normal(shape), tf.float32)
    layer = kh.OURS()
    layer.build(x.shape)

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(tf.reduce_sum(y * y), x), layer(x, training=False)

    for _ in range(200):
        step(x)
    before, pool_before = _rss_mb(), _pool_cached_mb()
    for _ in range(calls):
        step(x)
    grown = _rss_mb() - before
    assert grown < 16, f"RSS grew by {grown:.1f} MB over {calls} calls"
    # the pool reuses its buffers: what it holds free does not grow either
    assert _pool_cached_mb() - pool_before < 8


def test_concurrent_ops_from_tensorflow_threads():
    """Independent BN ops in one graph run on TensorFlow's inter-op threads at once."""
    rng = np.random.default_rng(8)
    xs = [tf.constant(rng.standard_normal((64, 40, 40, 8)).astype("float32") + i)
          for i in range(4)]

    @tf.function
    def parallel(*xs):
        return [_bridge.train(x, None, None, 3, 1e-3)[0] for x in xs]

    expected = [_bridge.train(x, None, None, 3, 1e-3)[0].numpy() for x in xs]
    for _ in range(5):
        for got, want in zip(parallel(*xs), expected):
            assert got.numpy().tobytes() == want.tobytes()


FALLBACK = """
    import warnings
    import numpy as np
    import keras_helpers as kh
    import keras_layer
    from keras_layer import _native
    x = np.random.default_rng(0).standard_normal((8, 3)).astype("float32")
    ours, stock = kh.make_pair((None, 3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ours(x, training=True)
        ours(x, training=True)
    np.testing.assert_allclose(y.numpy(), stock(x, training=True).numpy(), atol=1e-5)
    notes = [str(w.message) for w in caught if "TensorFlow op" in str(w.message)]
    print(len(notes), notes[0] if notes else "", _native.status())
"""


def test_without_a_compiler_the_layer_falls_back_with_one_note(tmp_path):
    proc = run_python(FALLBACK, CXX="/bin/false", NUMBABN_OP_DIR=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1 "), proc.stdout
    assert "could not be compiled" in proc.stdout and "tf.numpy_function" in proc.stdout


def test_opting_out_uses_numpy_function_silently():
    proc = run_python(FALLBACK, NUMBABN_TF_OP="0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0 "), proc.stdout
    assert "NUMBABN_TF_OP=0" in proc.stdout


def _graph_op_types(fn, *args):
    return [op.type for op in fn.get_concrete_function(*args).graph.get_operations()]


@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("depthwise", [False, True])
def test_inference_after_a_convolution_runs_tensorflows_fused_op(use_bias, depthwise):
    """In a graph, inference right after a Conv2D without a bias is FusedBatchNormV3,
    which grappler folds into the convolution; everywhere else (a convolution's bias in
    between, a depthwise convolution: nothing folds it then) it is numbabn's op. Both
    agree with the stock layer."""
    import keras

    conv = (keras.layers.DepthwiseConv2D(3, use_bias=use_bias) if depthwise
            else keras.layers.Conv2D(8, 3, use_bias=use_bias))
    ours, stock = kh.make_pair((None, 10, 10, 8))
    x = tf.constant(np.random.default_rng(9).standard_normal((4, 12, 12, 8)), tf.float32)
    conv(x)

    def model(layer):
        return tf.function(lambda x: layer(conv(x), training=False))

    types = _graph_op_types(model(ours), x)
    if use_bias or depthwise:
        assert "NumbabnInference" in types and "FusedBatchNormV3" not in types
    else:
        assert "FusedBatchNormV3" in types and "NumbabnInference" not in types
    np.testing.assert_allclose(model(ours)(x).numpy(), model(stock)(x).numpy(),
                               rtol=1e-5, atol=1e-5)
    # the same layer on a tensor no convolution produced, and eagerly: numbabn's op
    assert "NumbabnInference" in _graph_op_types(
        tf.function(lambda h: ours(h, training=False)), conv(x))
    np.testing.assert_allclose(ours(conv(x), training=False).numpy(),
                               stock(conv(x), training=False).numpy(), rtol=1e-5, atol=1e-5)


def test_large_outputs_reuse_pooled_buffers_once_released():
    """A large output's buffer returns to the pool when TensorFlow drops it, and the
    next call gets it back (no fresh pages); while it is held, it is not handed out."""
    x = tf.constant(np.random.default_rng(10).standard_normal((64, 32, 32, 16)), tf.float32)

    def address(t):
        return np.from_dlpack(t).ctypes.data

    y = _bridge.train(x, None, None, 3, 1e-3)[0]
    first = address(y)
    held = _bridge.train(x, None, None, 3, 1e-3)[0]
    assert address(held) != first  # y still holds its buffer
    del y
    again = _bridge.train(x, None, None, 3, 1e-3)[0]
    assert address(again) == first
    np.testing.assert_array_equal(again.numpy(), held.numpy())


# ------------------------------------------------------------- float16 and bfloat16

HALF_CASES = [((6, 5), 1), ((4, 5, 6, 3), 3), ((4, 3, 5, 6), 1), ((64, 40, 40, 8), 3),
              ((2048, 4, 3, 3), 1)]


def _half_numpy(t):
    """A half tensor as NumPy (float16, or ml_dtypes.bfloat16: what numbabn's API takes)."""
    a = t.numpy()
    assert a.dtype.itemsize == 2
    return a


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "function"])
@pytest.mark.parametrize("shape,axis", HALF_CASES, ids=[str(c) for c in HALF_CASES])
@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_op_equals_numpy_api_bitwise(half, shape, axis, graph):
    """The op on float16/bfloat16 tensors (float32 parameters, as under Keras's mixed
    policies) gives bitwise what numbabn's NumPy API gives on the same arrays: the same
    entry points compiled on the 16-bit patterns; the last case runs the parallel ones."""
    import numbabn as nbn
    from numbabn import stages

    rng = np.random.default_rng(11)
    channels = shape[axis]
    x = tf.cast(tf.constant(3.0 + 2.0 * rng.standard_normal(shape), tf.float32), half)
    dy = tf.cast(tf.constant(rng.standard_normal(shape), tf.float32), half)
    gamma = tf.constant(rng.uniform(0.5, 2, channels).astype("float32"))
    beta = tf.constant(rng.standard_normal(channels).astype("float32"))
    mm = tf.constant(rng.standard_normal(channels).astype("float32"))
    mv = tf.constant(rng.uniform(0.5, 2, channels).astype("float32"))

    def step(x, dy, gamma, beta, mm, mv):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta])
            y, mean, var = _bridge.train(x, gamma, beta, axis, 1e-3)
        dx, dgamma, dbeta = tape.gradient(y, [x, gamma, beta], output_gradients=dy)
        y_inf = _bridge.inference(x, gamma, beta, mm, mv, axis, 1e-3)
        return y, mean, var, dx, dgamma, dbeta, y_inf

    fn = tf.function(step) if graph else step
    if graph:  # the compiled op, not tf.numpy_function
        types = _graph_op_types(fn, x, dy, gamma, beta, mm, mv)
        assert {"NumbabnTrain", "NumbabnTrainGrad", "NumbabnInference"} <= set(types)
        assert "PyFunc" not in types and "PyFuncStateless" not in types
    y, mean, var, dx, dgamma, dbeta, y_inf = fn(x, dy, gamma, beta, mm, mv)
    for t in (y, dx, y_inf):
        assert t.dtype == half and t.shape == shape
    assert dgamma.dtype == dbeta.dtype == tf.float32

    x_np, dy_np = _half_numpy(x), _half_numpy(dy)
    y_ref, stats = nbn.batch_norm_train(x_np, gamma.numpy(), beta.numpy(), axis=axis,
                                        eps=1e-3)
    dx_ref, dg_ref, db_ref = nbn.batch_norm_backward(dy_np, x_np, gamma.numpy(), stats,
                                                     axis=axis)
    invstd = 1.0 / np.sqrt(mv.numpy().astype(np.float64) + 1e-3)
    y_inf_ref = stages.batch_norm_apply(x_np, gamma.numpy(), beta.numpy(), mm.numpy(),
                                        invstd, axis=axis)
    for got, want in [(y, y_ref), (dx, dx_ref), (y_inf, y_inf_ref)]:
        assert want.dtype == x_np.dtype
        assert _half_numpy(got).tobytes() == want.tobytes()
    assert mean.numpy().tobytes() == np.asarray(stats.mean, np.float64).tobytes()
    assert var.numpy().tobytes() == np.asarray(stats.var, np.float64).tobytes()
    assert dgamma.numpy().tobytes() == np.asarray(dg_ref, np.float32).tobytes()
    assert dbeta.numpy().tobytes() == np.asarray(db_ref, np.float32).tobytes()


HALF_FALLBACK = """
    import numpy as np
    import tensorflow as tf
    import keras
    import keras_helpers as kh
    from keras_layer import _native
    for policy, half, tol in [("mixed_float16", "float16", 2 * 2.0**-10),
                              ("mixed_bfloat16", "bfloat16", 2 * 2.0**-7)]:
        keras.mixed_precision.set_global_policy(policy)
        ours, stock = kh.make_pair((8, 5, 4, 3))
        for mode in ("eager", "function"):
            x, w = kh.data((8, 5, 4, 3), 7)
            x = tf.cast(x, half)
            (y_o, g_o), (y_s, g_s) = (kh.make_step(L, True, mode)(x, tf.constant(w))
                                      for L in (ours, stock))
            assert y_o.dtype == half and g_o[0].dtype == half
            for a, b in [(y_o, y_s), (g_o[0], g_s[0])]:
                np.testing.assert_allclose(tf.cast(a, tf.float32).numpy(),
                                           tf.cast(b, tf.float32).numpy(), rtol=tol, atol=tol)
            kh.assert_weights_close(ours, stock, 1e-5, mode)
    print("ok", _native.status())
"""


def test_half_precision_without_the_op_uses_numpy_function():
    """Under mixed_float16 / mixed_bfloat16 without the compiled op (NUMBABN_TF_OP=0),
    the tf.numpy_function bridge still gives the stock layer's values."""
    proc = run_python(HALF_FALLBACK, NUMBABN_TF_OP="0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok "), proc.stdout
    assert "NUMBABN_TF_OP=0" in proc.stdout


def test_entry_points_register_per_dtype_on_first_use():
    """float32's entry points at load (restored graphs run at once); another dtype's when a
    layer first builds an op of it (~30 s each with a cold Numba cache, so not at load)."""
    assert _native.load() is not None
    assert "float32" in _native._state["registered"]
    x = tf.constant(np.ones((4, 3), np.float64))
    assert _bridge._native_ops(x) is _native.load()
    assert "float64" in _native._state["registered"]


@pytest.mark.parametrize("shape, axis", [((64, 40, 40, 8), 3), ((16, 8, 40, 40), 1),
                                         ((48, 8, 3, 3), 1)])
def test_the_ops_give_the_same_bits_on_one_thread_and_on_tensorflows_pool(shape, axis):
    """Large inputs run their tasks on TensorFlow's intra-op pool, small ones on the
    calling thread (``numbabn_set_serial_below``): forced both ways, every output of the
    three ops is the same bits (the split into tasks is the shape's, merged in order)."""
    from numbabn import config

    ops = _native.load()
    assert ops is not None
    lib = _native._state["lib"]
    rng = np.random.default_rng(7)
    x = tf.constant((rng.standard_normal(shape) * 2 + 100).astype(np.float32))
    dy = tf.constant(rng.standard_normal(shape).astype(np.float32))
    C = shape[axis]
    g = tf.constant(np.linspace(0.5, 1.5, C))
    b = tf.constant(np.linspace(-1, 1, C))
    eps = tf.constant(1e-3, tf.float64)

    def run():
        y, mean, var, invstd = ops.numbabn_train(x, g, b, eps, axis=axis)
        dx, dg, db = ops.numbabn_train_grad(dy, x, mean, invstd, g, axis=axis)
        yi = ops.numbabn_inference(x, g, b, g, b + 2.0, eps, axis=axis)
        return [t.numpy() for t in (y, mean, var, invstd, dx, dg, db, yi)]

    try:
        lib.numbabn_set_serial_below(0)
        pooled = run()
        lib.numbabn_set_serial_below(2 ** 62)
        serial = run()
    finally:
        lib.numbabn_set_serial_below(config.SERIAL_BELOW)
    want_y, stats = nbn.batch_norm_train(x.numpy(), g.numpy(), b.numpy(), axis)
    for p, s in zip(pooled, serial):
        np.testing.assert_array_equal(p, s)
    np.testing.assert_array_equal(pooled[0], want_y)
    np.testing.assert_array_equal(pooled[2], stats.var)


def test_a_profiler_trace_attributes_the_ops_to_their_layer(tmp_path):
    """numbabn's forward and gradient ops show in TensorFlow's profiler at its default
    level (they trace themselves: TensorFlow traces inline ops only when verbose), named
    under the layer's scope, the gradient under ``gradient_tape/`` as TensorFlow's own,
    so ``benchmarks/model_trace.py`` (and TensorBoard) can say what each BN layer costs."""
    import keras

    import keras_layer
    from benchmarks import model_trace

    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=True)(inputs)
    h = keras_layer.BatchNormalization(name="my_bn")(h)
    outputs = keras.layers.Dense(2)(keras.layers.Flatten()(h))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    x = np.random.default_rng(11).standard_normal((8, 6, 6, 3)).astype(np.float32)
    y = np.zeros((8, 2), np.float32)
    events, _ = model_trace.trace_steps(lambda: model.train_on_batch(x, y), 1, str(tmp_path))
    scope = model_trace._bn_scope(["my_bn"])
    owners = {typ: {scope(op) for op, t, _ in events if t == typ}
              for typ in ("NumbabnTrain", "NumbabnTrainGrad")}
    assert owners == {"NumbabnTrain": {"my_bn"}, "NumbabnTrainGrad": {"my_bn"}}, owners
    assert any(op.startswith("gradient_tape/") for op, t, _ in events
               if t == "NumbabnTrainGrad")
