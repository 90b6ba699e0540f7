"""The public batch-normalization functions: NumPy arrays in and out, or GPU arrays.

Each call runs where its full-size arrays (``x``, ``dy``, ``out``; the moving arrays for
`update_moving_stats`) live: on the CPU (``_cpu``) for host arrays, on the GPU
(``_cuda``) when they are GPU arrays (``_device.is_device_array``). Both backends share
the validation and the maths here; they compute the same formulas.
"""

from typing import Any, NamedTuple

import numpy as np

from . import _cpu, _device
from . import _validation as check


def _backend(**arrays):
    """The backend for these named arrays (None ones ignored): CPU, or CUDA if on the GPU.

    Raises TypeError if some are on the GPU and some are not: numbabn never moves
    full-size data between host and GPU behind the caller's back.
    """
    if all(a is None or type(a) is np.ndarray for a in arrays.values()):
        return _cpu  # the common case, decided without looking further
    given = {name: a for name, a in arrays.items() if a is not None}
    on_gpu = [name for name, a in given.items() if _device.is_device_array(a)]
    if not on_gpu:
        return _cpu
    if len(on_gpu) < len(given):
        names = list(given)
        names = ", ".join(names[:-1]) + " and " + names[-1]
        listing = ", ".join(f"{name} is {_device.describe(a)}" for name, a in given.items())
        raise TypeError(f"{names} must be all host arrays or all GPU arrays (numbabn does "
                        f"not move them between the two); got {listing}")
    _device.cuda()  # a clear error where numba-cuda or a GPU is missing
    from . import _cuda

    return _cuda


class BatchStats(NamedTuple):
    """Per-channel statistics of one batch, as returned by `batch_norm_train`.

    NumPy arrays for a host batch; Numba device arrays for a GPU batch (they stay on
    the GPU for `batch_norm_backward` and `update_moving_stats`; ``.copy_to_host()``
    reads them).

    Attributes
    ----------
    mean : ndarray, shape (C,), float64
        Batch mean of each channel.
    var : ndarray, shape (C,), float64
        Biased batch variance (divided by the element count, as Keras and the paper use
        for normalization and for the moving variance).
    invstd : ndarray, shape (C,), float64
        ``1 / sqrt(var + eps)``, the factor the forward pass used; `batch_norm_backward`
        needs it.
    """

    mean: Any
    var: Any
    invstd: Any


def _kernel_dtype(a, backend):
    """``a`` as the backend's kernels take it: float16 and bfloat16 on the CPU, bfloat16
    on the GPU, as views of their bits (no copy; the kernels convert in registers, see
    `_half`)."""
    return backend.kernel_array(a)


def _direct_out(out, x, backend):
    """The caller's ``out`` as the kernels write it (see `_kernel_dtype`)."""
    return None if out is None else backend.kernel_array(out)


def _result(y, dtype, out, out_given):
    """The full-size result: the caller's own ``out`` object when one was given (a GPU
    ``out`` is validated as a Numba view of it, which is what the kernels wrote), else
    the kernel's output viewed back as ``dtype`` (from the bits of a half format)."""
    if out_given is not None:
        return out_given
    if out is not None:
        return out
    return y if y.dtype == dtype else y.view(dtype)


def batch_norm_train(x, gamma=None, beta=None, axis=-1, eps=1e-3, *, out=None):
    """Normalize ``x`` with its own batch statistics (training mode).

    ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, with ``mean`` and ``var`` taken
    per channel over every axis but ``axis``.

    Parameters
    ----------
    x : ndarray or GPU array, float16, bfloat16, float32 or float64, at least 2-D
        The batch: (N, C) for a dense layer, (N, H, W, C) with ``axis=-1`` or
        (N, C, H, W) with ``axis=1`` for conv feature maps; any rank and memory order.
        A GPU array (anything with ``__cuda_array_interface__``: Numba, CuPy, PyTorch)
        runs the CUDA kernels, and ``out`` must then be a GPU array too. bfloat16 is
        ``ml_dtypes.bfloat16`` (TensorFlow's and JAX's NumPy dtype): a NumPy array, or a
        Numba device array of that dtype (``cuda.to_device``, or ``.view`` of an int16
        one: the CUDA array interface cannot name bfloat16). Half inputs (float16,
        bfloat16) are read and written in their own format and computed in float64 on
        the CPU and the GPU alike: each output is the float64 result rounded once.
    gamma, beta : ndarray of shape (C,) or None
        Scale and offset. ``None`` means no scale (1) or no offset (0), like Keras's
        ``scale=False`` / ``center=False``.
    axis : int, default -1
        The channel axis; negative values count from the end.
    eps : float, default 1e-3
        Added to the variance before the square root (Keras's default); must be > 0.
    out : ndarray, optional
        Array of ``x``'s shape and dtype to write ``y`` into (``x`` itself is allowed).

    Returns
    -------
    y : ndarray, or Numba device array for a GPU ``x``
        Same shape and dtype as ``x`` (``out`` itself when given).
    stats : BatchStats
        ``(mean, var, invstd)``, float64 arrays of shape (C,), on the device of ``x``;
        pass them to `batch_norm_backward` and `update_moving_stats`.

    Raises
    ------
    TypeError
        A non-float dtype, a mismatched ``out`` dtype, host and GPU arrays mixed among
        ``x`` and ``out``, or a GPU ``gamma``/``beta`` with a host ``x``.
    ValueError
        Fewer than 2 dimensions, ``axis`` out of range, an empty batch, ``gamma``/``beta``
        of the wrong length, ``eps <= 0`` or a mismatched ``out`` shape.

    Notes
    -----
    One pass over ``x`` for the statistics, one for the output. The statistics use
    shifted sums in float64: the batch is split into tasks by its shape alone, each task
    sums ``x - K`` and ``(x - K)**2`` with ``K`` its first element, and the per-task
    (count, mean, M2) merge in order with Chan's formula. The shift makes the result
    independent of the mean's size (float32 data 1e4 + N(0, 1) get their variance to
    float64 accuracy, where ``E[x**2] - E[x]**2`` would lose every digit), the fixed split
    makes it bitwise independent of the thread count, and a constant channel gets
    exactly its value as mean and 0 as variance, so it normalizes to exactly ``beta``.
    NaN or Inf in a channel make that channel's outputs NaN and no other.

    On the GPU each thread runs Welford's update over its slice in float64, blocks
    merge their threads with Chan's formula in a fixed tree, and a second kernel merges
    the per-block partials of each channel in a fixed order: deterministic (no float
    atomics; the split comes from the shape), with the same guarantees as above.

    Examples
    --------
    >>> import numpy as np, numbabn as nbn
    >>> x = np.random.default_rng(0).normal(5.0, 2.0, size=(256, 8)).astype(np.float32)
    >>> y, stats = nbn.batch_norm_train(x, np.ones(8), np.zeros(8))
    >>> bool(abs(y.mean(axis=0)).max() < 1e-5), stats.mean.shape
    (True, (8,))
    """
    backend = _backend(x=x, out=out)
    gpu = backend is not _cpu
    x, axis = check.batch_input(x, axis)
    channels = x.shape[axis]
    gamma = check.channel_vector(gamma, "gamma", channels, optional=True, device=gpu)
    beta = check.channel_vector(beta, "beta", channels, optional=True, device=gpu)
    eps = check.positive_float(eps, "eps")
    out_given, out = out, check.out_array(out, x.shape, x.dtype, [x])

    y, mean, var, invstd = backend.train(_kernel_dtype(x, backend), axis, gamma, beta, eps,
                                         _direct_out(out, x, backend))
    return _result(y, x.dtype, out, out_given), BatchStats(mean, var, invstd)


def batch_norm_inference(x, gamma, beta, moving_mean, moving_var, axis=-1, eps=1e-3, *,
                         out=None):
    """Normalize ``x`` with moving statistics (inference mode).

    ``y = (x - moving_mean) / sqrt(moving_var + eps) * gamma + beta``, one pass over ``x``.

    Parameters
    ----------
    x : ndarray or GPU array
        As in `batch_norm_train`.
    gamma, beta : ndarray of shape (C,) or None
        Scale and offset (``None``: 1 and 0).
    moving_mean, moving_var : ndarray of shape (C,)
        The statistics to normalize with; ``moving_var`` must be non-negative (checked
        for host arrays; a GPU ``moving_var`` is not read back to check it, and a
        negative value gives NaN in its channel).
    axis : int, default -1
        The channel axis.
    eps : float, default 1e-3
        Added to ``moving_var``; must be >= 0 (0 as torch allows it at inference: a
        zero ``moving_var`` then gives inf or NaN in its channel).
    out : ndarray, optional
        Array of ``x``'s shape and dtype to write into (``x`` itself is allowed).

    Returns
    -------
    y : ndarray
        Same shape and dtype as ``x``.

    Raises
    ------
    TypeError, ValueError
        As `batch_norm_train`; also for moving statistics of the wrong length or a
        negative ``moving_var``.
    """
    backend = _backend(x=x, out=out)
    gpu = backend is not _cpu
    x, axis = check.batch_input(x, axis)
    channels = x.shape[axis]
    gamma = check.channel_vector(gamma, "gamma", channels, optional=True, device=gpu)
    beta = check.channel_vector(beta, "beta", channels, optional=True, device=gpu)
    moving_mean = check.channel_vector(moving_mean, "moving_mean", channels, device=gpu)
    moving_var = check.channel_vector(moving_var, "moving_var", channels, device=gpu)
    if isinstance(moving_var, np.ndarray) and _cpu.any_negative(moving_var):
        raise ValueError(f"moving_var must be non-negative; got minimum {np.nanmin(moving_var)}")
    eps = check.positive_float(eps, "eps", zero=True)
    out_given, out = out, check.out_array(out, x.shape, x.dtype, [x])

    y = backend.inference(_kernel_dtype(x, backend), axis, gamma, beta, moving_mean,
                          moving_var, eps, _direct_out(out, x, backend))
    return _result(y, x.dtype, out, out_given)


def batch_norm_backward(dy, x, gamma, stats, axis=-1, *, out=None):
    """Gradients of `batch_norm_train` with respect to ``x``, ``gamma`` and ``beta``.

    Closed form, with ``xhat = (x - mean) * invstd`` recomputed from ``stats`` (nothing of
    the size of ``x`` is saved by the forward pass)::

        dbeta  = sum(dy)
        dgamma = sum(dy * xhat)
        dx     = gamma * invstd * (dy - dbeta / n - xhat * dgamma / n)

    where sums run over the ``n`` elements of each channel.

    Parameters
    ----------
    dy : ndarray
        Gradient of the loss with respect to the forward output; shape and dtype of ``x``.
    x : ndarray
        The forward input.
    gamma : ndarray of shape (C,) or None
        The scale used in the forward pass (``None``: 1).
    stats : BatchStats
        The statistics `batch_norm_train` returned for ``x``.
    axis : int, default -1
        The channel axis used in the forward pass.
    out : ndarray, optional
        Array of ``x``'s shape and dtype to write ``dx`` into (``dy`` itself is allowed).

    Returns
    -------
    dx : ndarray, or Numba device array for GPU inputs
        Same shape and dtype as ``x``.
    dgamma, dbeta : ndarray of shape (C,), float64, on the device of ``x``
        Returned whether or not the layer has a scale and an offset.

    Notes
    -----
    Two passes over ``dy`` and ``x``: one computes ``sum(dy)`` and ``sum(dy * (x - mean))``
    per channel in float64 (fixed task split, partial sums added in task order, so the
    result is bitwise independent of the thread count), one writes ``dx``. On the GPU
    the sums take two deterministic stages, as the statistics of `batch_norm_train`.
    """
    backend = _backend(x=x, dy=dy, out=out)
    gpu = backend is not _cpu
    x, axis = check.batch_input(x, axis)
    dy = check.same_as_x(dy, x, "dy")
    channels = x.shape[axis]
    gamma = check.channel_vector(gamma, "gamma", channels, optional=True, device=gpu)
    mean, invstd = check.batch_stats(stats, channels, device=gpu)
    out_given, out = out, check.out_array(out, x.shape, x.dtype, [x, dy])

    dx, dgamma, dbeta = backend.backward(_kernel_dtype(dy, backend), _kernel_dtype(x, backend),
                                         axis, gamma, mean, invstd,
                                         _direct_out(out, x, backend))
    return _result(dx, x.dtype, out, out_given), dgamma, dbeta


def update_moving_stats(moving_mean, moving_var, stats, momentum=0.99):
    """Fold one batch's statistics into the moving statistics, in place.

    Keras's convention: ``moving = moving * momentum + batch * (1 - momentum)``, with the
    biased batch variance (``stats.var``). (PyTorch's ``momentum`` is ``1 - momentum``
    here, and it folds the unbiased variance.)

    Parameters
    ----------
    moving_mean, moving_var : ndarray or GPU array of shape (C,)
        Float arrays updated in place; start them at zeros and ones. GPU arrays are
        updated on the GPU (``stats`` may then be host or GPU arrays); host arrays need
        host ``stats``.
    stats : BatchStats
        From `batch_norm_train`.
    momentum : float in [0, 1], default 0.99

    Returns
    -------
    moving_mean, moving_var : ndarray
        The same arrays, updated.
    """
    momentum = check.momentum_value(momentum)
    backend = _backend(moving_mean=moving_mean, moving_var=moving_var)
    gpu = backend is not _cpu
    try:
        channels = len(stats.mean)
    except (AttributeError, TypeError):
        raise TypeError("stats must be the BatchStats returned by batch_norm_train; "
                        f"got {type(stats).__name__}") from None
    mm = check.moving_array(moving_mean, "moving_mean", channels)
    mv = check.moving_array(moving_var, "moving_var", channels)
    batch_mean = check.channel_vector(stats.mean, "stats.mean", channels, device=gpu,
                                      anchor="moving_mean")
    batch_var = check.channel_vector(stats.var, "stats.var", channels, device=gpu,
                                     anchor="moving_var")
    backend.update_moving(mm, batch_mean, momentum)
    backend.update_moving(mv, batch_var, momentum)
    return moving_mean, moving_var
