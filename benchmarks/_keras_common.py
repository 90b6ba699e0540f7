"""Helpers for the Keras-layer benchmarks (``bench_keras.py``, ``keras_report.py``).

Three ways to run one batch-normalization training step on the same channels-last input,
each inside a ``tf.function``: forward with batch statistics, the moving-average update,
and the backward to x, gamma and beta (``tape.gradient`` of ``sum(y * w)``, ``w`` fixed):

* ``stock``: ``keras.layers.BatchNormalization`` (Keras 3: ``tf.nn.moments`` +
  ``tf.nn.batch_normalization``, unfused, no XLA: Keras turns XLA off on CPU-only hosts);
* ``numbabn``: ``keras_layer.BatchNormalization`` (numbabn kernels via tf.numpy_function);
* ``fused``: ``tf.raw_ops.FusedBatchNormV3`` (its registered gradient is
  ``FusedBatchNormGradV3``) with the moving update written as Keras does it.

And the bridge itself: per-call cost of ``tf.numpy_function``, and whether TensorFlow
copies the array a NumPy function returns (it does unless the data are 64-byte aligned).

asv imports every module here while discovering benchmarks: no ``time_*``/``track_*``
names. TensorFlow and Keras are imported inside the functions, so discovery stays fast.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before Numba/TF load: see _common
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from ._common import (  # noqa: E402
    CASES, EPS, best_of_interleaved, check_close, make_inputs, settle_compiled_op,
)

MOMENTUM = 0.99  # Keras's default
KINDS = ("stock", "numbabn", "fused")
#: The 51 MB ResNet-50 conv2 activation (NHWC float32) and a cache-sized one.
KERAS_CASES = {"nhwc": CASES["nhwc"], "small": CASES["small"]}
BIG_SHAPE = CASES["nhwc"][0]


def _tensors(shape, axis, dtype):
    import tensorflow as tf

    inp = make_inputs(shape, axis, dtype)
    if inp["x"].ndim not in (2, 4) or axis != inp["x"].ndim - 1:
        raise NotImplementedError("the fused path here is written for channels last only")
    params = {k: inp[k].astype(dtype) for k in ("gamma", "beta", "moving_mean", "moving_var")}
    return tf.constant(inp["x"]), tf.constant(inp["dy"]), params


def _step_fns(forward, inference, x, w, weights, moving):
    """The benchmarked calls around a training-mode ``forward()`` (returns y and updates
    the moving statistics) and an ``inference()``: see `build_fns`."""
    import tensorflow as tf

    @tf.function
    def train():
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = forward()
            loss = tf.reduce_sum(y * w)
        return (y, *tape.gradient(loss, [x, *weights]))

    return dict(train=train, inference=tf.function(inference), eager=forward,
                moving=lambda: [v.numpy() for v in moving])


def _layer_fns(cls, x, w, params):
    layer = cls(axis=-1, momentum=MOMENTUM, epsilon=EPS)
    layer.build(x.shape)
    layer.set_weights([params[k] for k in ("gamma", "beta", "moving_mean", "moving_var")])

    def forward():
        return layer(x, training=True)

    def inference():
        return layer(x, training=False)

    return _step_fns(forward, inference, x, w, [layer.gamma, layer.beta],
                     [layer.moving_mean, layer.moving_variance])


def _fused_fns(x, w, params):
    import tensorflow as tf

    gamma, beta, mm, mv = (tf.Variable(params[k]) for k in
                           ("gamma", "beta", "moving_mean", "moving_var"))
    empty = tf.constant(np.empty(0, np.float32))
    n = x.shape.num_elements() // x.shape[-1]
    fused = tf.raw_ops.FusedBatchNormV3
    def as_4d(t):  # the op takes 4-D input only: a dense (N, C) batch goes as (N, 1, 1, C)
        return t if t.shape.rank == 4 else tf.reshape(t, [-1, 1, 1, t.shape[-1]])

    def forward():
        y, mean, var = fused(x=as_4d(x), scale=gamma, offset=beta, mean=empty, variance=empty,
                             epsilon=EPS, data_format="NHWC", is_training=True)[:3]
        var = var * ((n - 1) / n)  # the op returns Bessel's variance; Keras averages the biased
        mm.assign(mm * MOMENTUM + mean * (1.0 - MOMENTUM))
        mv.assign(mv * MOMENTUM + var * (1.0 - MOMENTUM))
        return tf.reshape(y, x.shape)

    def inference():
        return tf.reshape(fused(x=as_4d(x), scale=gamma, offset=beta, mean=mm, variance=mv,
                                epsilon=EPS, data_format="NHWC", is_training=False)[0],
                          x.shape)

    return _step_fns(forward, inference, x, w, [gamma, beta], [mm, mv])


def build_fns(shape, axis, dtype, kinds=KINDS):
    """``{kind: {"train": fn, "inference": fn, "eager": fn, "moving": fn}}``.

    Each ``fn`` takes no argument. ``train``: the training step in a ``tf.function``;
    ``inference``: a ``training=False`` call in a ``tf.function``; ``eager``: one
    training-mode forward call outside any ``tf.function`` (y and the moving update, no
    gradient), as in a custom eager loop or a debugging session; ``moving``: the moving
    statistics as NumPy arrays. Every kind starts from the same x, w and weights
    (``_common.make_inputs``).
    """
    import keras

    import keras_layer

    x, w, params = _tensors(shape, axis, dtype)
    makers = {"stock": lambda: _layer_fns(keras.layers.BatchNormalization, x, w, params),
              "numbabn": lambda: _layer_fns(keras_layer.BatchNormalization, x, w, params),
              "fused": lambda: _fused_fns(x, w, params)}
    return {k: makers[k]() for k in kinds}


def check_agreement(fns, tol=1e-3):
    """One fresh step of every kind against the stock layer: outputs, gradients, moving
    statistics, inference afterwards, then an eager forward call. Raises AssertionError
    on a mismatch, so a wrong layer is never timed. Call before any other step (the
    moving statistics must agree).

    Scaled errors |a - b| / (1 + |b|); float32 sums over 200k elements in TF's kernels make
    1e-3 loose enough for them and tight enough to catch a wrong formula."""
    names = ("y", "dx", "dgamma", "dbeta", "moving_mean", "moving_var", "inference y",
             "eager y", "moving_mean after eager", "moving_var after eager")
    results = {kind: [t.numpy() for t in f["train"]()] + f["moving"]()
               + [f["inference"]().numpy(), f["eager"]().numpy()] + f["moving"]()
               for kind, f in fns.items()}
    want = results.get("stock")
    for kind, got in results.items():
        for name, a, b in zip(names, got, want, strict=True):
            check_close(f"{kind} vs stock: {name}", a, b.astype(np.float64), tol)
    settle_compiled_op()


#: the calls `bench_keras` and `keras_report` time for each kind
TIMED = ("train", "inference", "eager")


def glue_fn(shape, axis, dtype):
    """The train step's loss plumbing alone, the same in every kind: the tf.function of
    `_layer_fns` with ``y = tf.identity(x)`` (``y * w``, its sum, and their gradient)."""
    import tensorflow as tf

    x, w, _ = _tensors(shape, axis, dtype)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.identity(x) * w)
        return tape.gradient(loss, x)

    return step


def kernel_fns(shape, axis, dtype):
    """numbabn called from NumPy with no TF around it, allocating like the layer does.

    Returns ``{"train": fn, "inference": fn}``, train = forward + moving update +
    backward. The gap to the layer's time is what the TF bridge and graph around it cost.
    """
    import numbabn as nbn

    inp = make_inputs(shape, axis, dtype)
    x, w = inp["x"], inp["dy"]
    g, b, mm, mv = (inp[k].astype(dtype) for k in ("gamma", "beta", "moving_mean",
                                                    "moving_var"))

    def train():
        _, stats = nbn.batch_norm_train(x, g, b, axis, EPS)
        nbn.update_moving_stats(mm, mv, stats, MOMENTUM)
        return nbn.batch_norm_backward(w, x, g, stats, axis)

    return {"train": train,
            "inference": lambda: nbn.batch_norm_inference(x, g, b, mm, mv, axis, EPS)}


# ------------------------------------------------------------------------ the bridge

def _offset_view(raw, offset, shape):
    """A float32 view of ``raw`` whose data start ``offset`` bytes past a 64-byte line."""
    start = (-raw.ctypes.data % 64) + offset
    return raw[start:start + int(np.prod(shape)) * 4].view(np.float32).reshape(shape)


def offset_array(shape, offset):
    """A fresh float32 array of ``shape`` at ``offset`` bytes past a 64-byte boundary."""
    return _offset_view(np.empty(int(np.prod(shape)) * 4 + 128, np.uint8), offset, shape)


try:  # private NumPy switch: madvise(MADV_HUGEPAGE) on large new arrays (default on)
    from numpy._core.multiarray import _set_madvise_hugepage as _set_hugepage
except ImportError:  # pragma: no cover - NumPy < 2 or a future NumPy
    _set_hugepage = None


def bridge_fns(shape=BIG_SHAPE):
    """Zero-argument callables (tf.functions but the NumPy references) probing the
    numpy_function boundary.

    ``identity``/``noop``: a tiny tensor through ``tf.identity`` / a NumPy no-op (the
    difference is the per-call cost of the bridge). ``fresh_aligned``/``fresh_unaligned``:
    a NumPy function filling and returning a fresh ``shape`` array, 64-byte aligned or at
    np.empty's 16 bytes; ``prealloc_aligned``/``prealloc_unaligned``: returning one
    preallocated array (no work in NumPy at all). ``numpy_copy``: NumPy allocating and
    copying one such array, the cost a copy at the boundary would add; ``numpy_copy_4k``:
    the same with NumPy's transparent-huge-page request (madvise) off for the new array,
    so it page-faults 4 KiB at a time like TensorFlow's allocations (absent if this NumPy
    has no such switch).
    """
    import tensorflow as tf

    tiny, big = tf.zeros((4,), tf.float32), tf.zeros((1,), tf.float32)
    held = {o: offset_array(shape, o) for o in (0, 16)}
    for a in held.values():
        a.fill(1.0)
    src = held[0]

    def graph(py):
        return tf.function(lambda: tf.numpy_function(py, [big], tf.float32, stateful=True))

    def fresh(offset):
        def py(_):
            a = offset_array(shape, offset)
            a.fill(1.0)
            return a
        return graph(py)

    def copy_4k():
        previous = _set_hugepage(False)
        try:
            dst = np.empty_like(src)
        finally:
            _set_hugepage(previous)
        np.copyto(dst, src)

    fns = {
        "identity": tf.function(lambda: tf.identity(tiny)),
        "noop": tf.function(lambda: tf.numpy_function(lambda a: a, [tiny], tf.float32,
                                                      stateful=True)),
        "fresh_aligned": fresh(0), "fresh_unaligned": fresh(16),
        "prealloc_aligned": graph(lambda _: held[0]),
        "prealloc_unaligned": graph(lambda _: held[16]),
        "numpy_copy": lambda: np.copyto(np.empty_like(src), src),
        "numpy_copy_4k": copy_4k,
    }
    if _set_hugepage is None:
        del fns["numpy_copy_4k"]
    return fns


def zero_copy(offset, shape=(1024, 1024)):
    """Whether a tf.function takes a NumPy function's result without copying it, and
    passes a tensor into a NumPy function without copying: pointers compared.

    Returns ``(output_zero_copy, input_zero_copy)``.
    """
    import tensorflow as tf

    seen = {}

    def produce(_):
        a = offset_array(shape, offset)
        a.fill(1.0)
        seen["made"] = a.ctypes.data
        return a

    def consume(a):
        seen["got"] = a.ctypes.data
        return a

    @tf.function
    def f(t):
        return tf.numpy_function(consume, [tf.numpy_function(produce, [t], tf.float32)],
                                 tf.float32)

    x = tf.random.normal((8, 8))
    out = f(x)
    out_ok = seen["made"] == seen["got"]
    seen.clear()
    tf.function(lambda t: tf.numpy_function(consume, [t], tf.float32))(out)
    return out_ok, seen["got"] == np.from_dlpack(out).ctypes.data


def bridge_timings(repeat=20):
    """``{name: seconds}`` for every `bridge_fns` function (best of ``repeat``, in turns)."""
    return best_of_interleaved(bridge_fns(), repeat)


def bridge_overhead(repeat=30):
    """Seconds one tf.numpy_function call adds to a tf.function (tiny tensor, no-op)."""
    fns = bridge_fns()
    t = best_of_interleaved({k: fns[k] for k in ("noop", "identity")}, repeat)
    return t["noop"] - t["identity"]


def thread_info():
    """One line: TF's pools, Numba's threads and threading layer."""
    import numba
    import tensorflow as tf

    import numbabn as nbn

    nbn.batch_norm_train(np.ones((1024, 1024), np.float32), None, None)  # start Numba's pool
    intra = tf.config.threading.get_intra_op_parallelism_threads() or os.cpu_count()
    inter = tf.config.threading.get_inter_op_parallelism_threads() or os.cpu_count()
    return (f"TensorFlow intra-op {intra} / inter-op {inter} threads; Numba "
            f"{numba.get_num_threads()} threads ({numba.threading_layer()} layer); "
            f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
