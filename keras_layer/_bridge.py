"""TensorFlow ops that run the numbabn kernels: forward, inference and their gradients.

Two bridges, one maths:

* **The compiled op** (``keras_layer._native``), used whenever it loads: three C++ ops
  that call numbabn's Numba-compiled C entry points on buffers TensorFlow allocates. No
  Python or GIL per call, outputs from TensorFlow's allocator (reused memory, no fresh
  pages), an output may reuse its input's buffer, and eager calls cost what any
  TensorFlow op costs. float16, bfloat16, float32 and float64 (the half formats read
  and written in their own format by the kernels, no cast in TensorFlow ops).
* **``tf.numpy_function``**, wherever the op cannot be built or used
  (see ``_native``): TensorFlow hands its CPU buffers to NumPy without a copy, and takes
  back a NumPy array without a copy when the array's data are aligned to 64 bytes
  (``_aligned_empty``; TensorFlow copies anything less aligned than Eigen wants).
  Executed eagerly, a ``numpy_function`` copies its inputs and outputs (51 MB: 50 of a
  65 ms call), so eager calls on CPU tensors pass the buffers through DLPack instead,
  both ways without a copy (`_call`).

Gradients are ``tf.custom_gradient`` functions whose backward runs numbabn's closed-form
kernel; the forward saves only the per-channel mean and ``invstd`` (float64), never a
full-size intermediate. Both bridges give bitwise the same results (the tests compare).
"""

import contextlib

import numpy as np
import tensorflow as tf

import numbabn as nbn
from numbabn import _pool, stages

from . import _native

_ALIGN = 64


def _aligned_empty(shape, dtype):
    """An uninitialized array whose data start on a 64-byte boundary (large ones from
    numbabn's output pool: no fresh pages per call)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return _pool.empty_bytes(nbytes).view(dtype).reshape(shape)


def _on_cpu(t):
    return "CPU" in (t.device or "CPU").upper()


def _to_tensor(a):
    """A NumPy result as an eager tensor: through DLPack (no copy) when 64-byte aligned."""
    if a.ctypes.data % _ALIGN == 0 and a.flags.c_contiguous and a.size:
        return tf.experimental.dlpack.from_dlpack(a.__dlpack__())
    return tf.constant(a)


def _call(fn, inputs, tout, name):
    """``fn`` on NumPy views of ``inputs``, as TensorFlow tensors of dtypes ``tout``.

    Like ``tf.numpy_function(fn, inputs, tout, stateful=False, name=name)``, which it is
    in graphs. Eagerly on CPU tensors, ``fn`` runs right here on DLPack views of the
    inputs (read-only, no copy), and its aligned results become tensors without a copy.
    """
    if not (tf.executing_eagerly() and all(_on_cpu(t) for t in inputs)):
        return tf.numpy_function(fn, inputs, tout, stateful=False, name=name)
    out = fn(*(np.from_dlpack(t) for t in inputs))
    if not isinstance(tout, (list, tuple)):
        return _to_tensor(out)
    return [_to_tensor(a) for a in out]


def _second_order_error(*_, **__):
    raise NotImplementedError(
        "keras_layer.BatchNormalization: second-order gradients (a gradient of its "
        "gradient) are not implemented; its backward pass runs a NumPy kernel that "
        "TensorFlow cannot differentiate. Use keras.layers.BatchNormalization for "
        "higher-order derivatives (keras_layer.convert(model, to='keras')).")


def _first_order_only(grads, sources):
    """``grads`` through an identity that refuses to be differentiated.

    ``sources`` (the tensors the gradients were computed from, x and dy) are inputs of
    the guard too: the numpy_function that computed ``grads`` is invisible to an outer
    tape, so without them an eager second-order request would quietly get ``None``.
    """
    n = len(grads)

    @tf.custom_gradient
    def guard(*tensors):
        return [tf.identity(t) for t in tensors[:n]], _second_order_error

    return guard(*grads, *sources)


def _gradient_scope(scope):
    """The name scope for a custom gradient's ops, given the forward's (``scope``, read
    with ``tf.get_current_name_scope()`` in the forward): that scope under
    ``gradient_tape/``, where TensorFlow puts its own ops' gradients. Without it the
    gradient op is named ``NumbabnTrainGrad_12``, and a profile or a graph cannot tell
    which layer it belongs to. Nothing outside a graph (an empty scope)."""
    return tf.name_scope(f"gradient_tape/{scope}/") if scope else contextlib.nullcontext()


def _static_shape(t, like):
    t.set_shape(like.shape)
    return t


def _channel_params(tensors, flags):
    """Unpack the optional (gamma, beta) that the op received as extra inputs."""
    it = iter(tensors)
    return tuple(next(it) if flag else None for flag in flags)


def _param_grads(dx, dgamma, dbeta, flags, params_np):
    """[dx, dgamma?, dbeta?] in the parameters' dtypes, for the parameters the op has."""
    outs = [dx]
    if flags[0]:
        outs.append(dgamma.astype(params_np[0].dtype))
    if flags[1]:
        outs.append(dbeta.astype(params_np[-1].dtype))
    return outs


def _gradient_op(backward, inputs, x, params, name):
    """Run a NumPy ``backward`` -> (dx, dgamma?, dbeta?) as a first-order-only gradient.

    ``inputs`` starts with ``dy, x``.
    """
    grads = _call(backward, inputs, [x.dtype] + [p.dtype for p in params], name)
    if not isinstance(grads, (list, tuple)):  # a one-element Tout gives a bare tensor
        grads = [grads]
    grads = list(grads)
    grads[0] = _static_shape(grads[0], x)
    for g, p in zip(grads[1:], params):
        g.set_shape(p.shape)
    return _first_order_only(grads, inputs[:2])


def train(x, gamma, beta, axis, epsilon):
    """Batch-statistics normalization as a differentiable TensorFlow op.

    Parameters
    ----------
    x : tf.Tensor, float16, bfloat16 (compiled op only), float32 or float64
    gamma, beta : tf.Tensor of shape (C,) (float32 or float64) or None
    axis : int
        Non-negative channel axis.
    epsilon : float

    Returns
    -------
    y : tf.Tensor like ``x``
    mean, var : tf.Tensor, float64, shape (C,)
        Batch statistics; not differentiable (they feed the moving averages).
    """
    ops = _native_ops(x)
    if ops is not None:
        return _train_native(ops, x, gamma, beta, axis, epsilon)
    flags = (gamma is not None, beta is not None)
    params = [p for p in (gamma, beta) if p is not None]
    channels = x.shape[axis]

    @tf.custom_gradient
    def op(x, *params):
        def forward(x_np, *params_np):
            g, b = _channel_params(params_np, flags)
            y = _aligned_empty(x_np.shape, x_np.dtype)
            _, stats = nbn.batch_norm_train(x_np, g, b, axis=axis, eps=epsilon, out=y)
            return y, stats.mean, stats.var, stats.invstd

        y, mean, var, invstd = _call(forward, [x, *params],
                                     [x.dtype, tf.float64, tf.float64, tf.float64],
                                     "numbabn_train")
        y = _static_shape(y, x)
        for t in (mean, var, invstd):
            t.set_shape([channels])
        scope = tf.get_current_name_scope()

        def grad(dy, *_unused):  # no gradient flows into mean/var: see stop_gradient below
            with _gradient_scope(scope):
                return _train_gradient(dy)

        def _train_gradient(dy):
            def backward(dy_np, x_np, mean_np, invstd_np, *params_np):
                g, _ = _channel_params(params_np, flags)
                dx = _aligned_empty(x_np.shape, x_np.dtype)
                stats = nbn.BatchStats(mean_np, None, invstd_np)
                _, dgamma, dbeta = nbn.batch_norm_backward(dy_np, x_np, g, stats, axis=axis,
                                                           out=dx)
                return _param_grads(dx, dgamma, dbeta, flags, params_np)

            return _gradient_op(backward, [dy, x, mean, invstd, *params], x, params,
                                "numbabn_train_grad")

        return (y, mean, var), grad

    y, mean, var = op(x, *params)
    return y, tf.stop_gradient(mean), tf.stop_gradient(var)


def inference(x, gamma, beta, moving_mean, moving_var, axis, epsilon):
    """Moving-statistics normalization as a differentiable TensorFlow op.

    The gradient (rarely needed: fine-tuning with a frozen layer, input attributions) is
    plain TensorFlow arithmetic: ``dx = dy * gamma / sqrt(moving_var + eps)``, and the sums
    for gamma and beta.

    Inside a graph, a 4-D input that a convolution just produced runs TensorFlow's
    ``FusedBatchNormV3`` instead (`_fuses_into_convolution`): grappler folds it into the
    convolution on CPU, which no separate pass can beat (see the README's model table).
    """
    if _fuses_into_convolution(x, axis):
        return _fused_inference(x, gamma, beta, moving_mean, moving_var, axis, epsilon)
    flags = (gamma is not None, beta is not None)
    params = [p for p in (gamma, beta) if p is not None]
    ops = _native_ops(x)
    rank = x.shape.rank
    bshape = [1] * rank
    bshape[axis] = -1
    reduce_axes = [a for a in range(rank) if a != axis]

    @tf.custom_gradient
    def op(x, moving_mean, moving_var, *params):
        def forward(x_np, mm, mv, *params_np):
            g, b = _channel_params(params_np, flags)
            y = _aligned_empty(x_np.shape, x_np.dtype)
            if x_np.size == 0:  # an empty batch (no detections, say) normalizes to itself
                return y
            # the stock layer's formula for any moving variance, NaN where var + eps < 0
            # (a checkpoint may hold one; batch_norm_inference would refuse it)
            with np.errstate(invalid="ignore", divide="ignore"):
                invstd = 1.0 / np.sqrt(mv.astype(np.float64) + epsilon)
            return stages.batch_norm_apply(x_np, g, b, mm, invstd, axis=axis, out=y)

        if ops is not None:
            g, b = _native_params(gamma, beta, x)
            y = ops.numbabn_inference(x, g, b, tf.cast(moving_mean, g.dtype),
                                      tf.cast(moving_var, g.dtype),
                                      tf.constant(epsilon, tf.float64), axis=axis)
        else:
            y = _call(forward, [x, moving_mean, moving_var, *params], x.dtype,
                      "numbabn_inference")
        y = _static_shape(y, x)

        def grad(dy):
            wide = tf.float64 if x.dtype == tf.float64 else tf.float32  # as the forward

            def per_channel(v):
                return tf.reshape(tf.cast(v, wide), bshape)

            invstd = tf.math.rsqrt(per_channel(moving_var) + epsilon)
            g, _ = _channel_params(params, flags)
            scale = invstd if g is None else invstd * per_channel(g)
            dyw = tf.cast(dy, wide)
            grads = [tf.cast(dyw * scale, x.dtype), None, None]  # moving stats: not trainable
            if flags[0]:
                xhat = (tf.cast(x, wide) - per_channel(moving_mean)) * invstd
                grads.append(tf.cast(tf.reduce_sum(dyw * xhat, reduce_axes), params[0].dtype))
            if flags[1]:
                grads.append(tf.cast(tf.reduce_sum(dyw, reduce_axes), params[-1].dtype))
            return grads

        return y, grad

    return op(x, moving_mean, moving_var, *params)


# ------------------------------------------------------- inference after a convolution

#: Ops whose output grappler's remapper folds a following FusedBatchNormV3 into (on the
#: CPU: ``_FusedConv2D``). Not DepthwiseConv2dNative: after it FusedBatchNormV3 stays an
#: op of its own (seen in MobileNetV2's inference trace, ``benchmarks/model_trace.py``:
#: all 35 Conv2D-BN pairs folded, none of the 17 depthwise ones), where it costs more
#: than numbabn's op (``benchmarks/layer_profile.py``).
_CONVOLUTIONS = ("Conv2D",)


def _fuses_into_convolution(x, axis):
    """Whether ``x`` is a 4-D float32 or float16 graph tensor straight from a Conv2D
    without a bias (`_CONVOLUTIONS`).

    A heuristic on the graph as traced: grappler's remapper folds FusedBatchNormV3 into a
    Conv2D it directly follows, not into one with a BiasAdd (or Add) in between, where
    FusedBatchNormV3 alone costs more than numbabn's op or the stock layer's two ops
    (measured here, conv 1x1 then BN inference in a ``tf.function``, BN cost beyond the
    convolution: (32, 16, 16, 256) without bias 0.5 ms FusedBatchNormV3, 0.8 ms
    numbabn's op, 3.0 ms stock; with a bias 3.7 / ~0 / ~0 ms; (32, 32, 32, 64) without
    bias 0.2 / 1.4 / 2.3 ms, with 7.4 / 2.9 / 3.6 ms).
    """
    if tf.executing_eagerly() or x.shape.rank != 4 or axis not in (1, 3):
        return False
    if x.dtype not in (tf.float32, tf.float16) or not hasattr(x, "op"):
        return False
    return x.op.type in _CONVOLUTIONS


def _fused_inference(x, gamma, beta, moving_mean, moving_var, axis, epsilon):
    """TensorFlow's own inference op (float32 statistics and parameters, as Keras's)."""
    channels = x.shape[axis]
    return tf.raw_ops.FusedBatchNormV3(
        x=x, scale=tf.ones([channels]) if gamma is None else tf.cast(gamma, tf.float32),
        offset=tf.zeros([channels]) if beta is None else tf.cast(beta, tf.float32),
        mean=tf.cast(moving_mean, tf.float32), variance=tf.cast(moving_var, tf.float32),
        epsilon=epsilon, data_format="NHWC" if axis == 3 else "NCHW", is_training=False)[0]


# ------------------------------------------------------------------ the compiled op

_NATIVE_DTYPES = (tf.float16, tf.bfloat16, tf.float32, tf.float64)


def native_available(dtype):
    """Whether inputs of ``dtype`` run the compiled op (else ``tf.numpy_function``)."""
    return tf.as_dtype(dtype) in _NATIVE_DTYPES and _native.load() is not None


def _native_ops(x):
    """The compiled op module for this input, or None (no op: see `_native`)."""
    if x.dtype not in _NATIVE_DTYPES:
        return None
    return _native.ensure(x.dtype.name)


def _native_params(gamma, beta, x):
    """gamma and beta for the op: one float dtype (float32 or float64: the op's P), an
    empty vector for an absent one."""
    dtype = next((p.dtype for p in (gamma, beta) if p is not None), x.dtype)
    if dtype not in (tf.float32, tf.float64):  # half parameters, or none with half x
        dtype = tf.float32
    empty = tf.zeros([0], dtype)
    return (empty if gamma is None else tf.cast(gamma, dtype),
            empty if beta is None else tf.cast(beta, dtype))


def _train_native(ops, x, gamma, beta, axis, epsilon):
    """`train` on the compiled op: same outputs, gradients and guards."""
    if x.shape.num_elements() == 0:  # known now: refuse as numbabn's API does
        raise ValueError(f"empty batch: x has shape {tuple(x.shape)}, so each of its "
                         f"{x.shape[axis]} channels (axis {axis}) has no elements")
    flags = (gamma is not None, beta is not None)
    params = [p for p in (gamma, beta) if p is not None]
    eps = tf.constant(epsilon, tf.float64)

    @tf.custom_gradient
    def op(x, *params):
        g, b = _native_params(*_channel_params(params, flags), x)
        y, mean, var, invstd = ops.numbabn_train(x, g, b, eps, axis=axis)
        scope = tf.get_current_name_scope()

        def grad(dy, *_unused):  # no gradient flows into mean/var: see stop_gradient below
            with _gradient_scope(scope):
                dx, dgamma, dbeta = ops.numbabn_train_grad(dy, x, mean, invstd, g,
                                                           axis=axis)
            grads = [dx]
            if flags[0]:
                grads.append(tf.cast(dgamma, params[0].dtype))
            if flags[1]:
                grads.append(tf.cast(dbeta, params[-1].dtype))
            return _first_order_only(grads, [dy, x])

        return (y, mean, var), grad

    y, mean, var = op(x, *params)
    return y, tf.stop_gradient(mean), tf.stop_gradient(var)
