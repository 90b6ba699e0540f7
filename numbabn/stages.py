"""The stages of batch normalization, callable one by one (for synchronized BN and more).

`batch_norm_train` and `batch_norm_backward` are each two passes over the data with a
per-channel step between them. Exposing the seams lets statistics be merged across
devices or replicas before normalizing (synchronized batch norm), and gradient sums be
reduced across them before the input gradient, with the same kernels::

    local = batch_moments(x_r, axis)                      # on each replica r
    total = merge_moments([local_0, local_1, ...])        # same order everywhere
    invstd = 1 / np.sqrt(total.var + eps)
    y_r = batch_norm_apply(x_r, gamma, beta, total.mean, invstd, axis)
    sums_r = batch_norm_grad_sums(dy_r, x_r, total.mean, axis)
    dx_r = batch_norm_grad_input(dy_r, x_r, gamma, total.mean, invstd,
                                 sum over r of sums_r, total.count, axis)

`merge_moments` uses Chan's rule on (count, mean, M2), so unequal counts (the last,
partial batch of an epoch) merge correctly and large means lose nothing.
"""

from typing import NamedTuple

import numpy as np

from . import _cpu as backend
from . import _validation as check
from ._kernels_cpu import _merge_moments
from . import batchnorm
from .batchnorm import _direct_out, _result

# CPU only for now: GPU arrays fail validation here (numbabn.batchnorm dispatches).


class Moments(NamedTuple):
    """Per-channel element count, mean and biased variance (float64, shape (C,))."""

    count: np.ndarray
    mean: np.ndarray
    var: np.ndarray


def _kernel_dtype(a):
    return batchnorm._kernel_dtype(a, backend)


def batch_moments(x, axis=-1):
    """Count, mean and biased variance of each channel of ``x`` (one pass, float64).

    Parameters
    ----------
    x : ndarray
        As in `batch_norm_train`.
    axis : int, default -1
        The channel axis.

    Returns
    -------
    Moments
        ``count`` holds the number of elements per channel (as float64, so moments of
        several parts stack into one array).
    """
    x, axis = check.batch_input(x, axis)
    mean, var = backend.channel_stats(_kernel_dtype(x), axis)
    count = np.full(x.shape[axis], x.size // x.shape[axis], dtype=np.float64)
    return Moments(count, mean, var)


def merge_moments(parts):
    """Merge the `Moments` of several parts of a batch, in the order given (Chan's rule).

    Parameters
    ----------
    parts : sequence of Moments, or array of shape (P, 3, C)
        ``(count, mean, var)`` of each part; parts with a zero count are skipped.

    Returns
    -------
    Moments
        Of the whole batch; the same inputs in the same order give the same bits.
    """
    stacked = np.asarray(parts, dtype=np.float64)
    if stacked.ndim != 3 or stacked.shape[1] != 3:
        raise ValueError("parts must be a sequence of (count, mean, var) triples of "
                         f"per-channel vectors, shape (P, 3, C); got shape {stacked.shape}")
    counts, means, variances = stacked[:, 0], stacked[:, 1], stacked[:, 2]
    if not np.all(counts == counts[:, :1]):
        raise ValueError("parts must have one count per part, equal across channels")
    keep = counts[:, 0] > 0
    if not keep.any():
        raise ValueError("empty batch: every part has a zero count")
    counts, means, variances = counts[keep, 0], means[keep], variances[keep]
    channels = means.shape[1]
    mean, var = np.empty(channels), np.empty(channels)
    _merge_moments(np.ascontiguousarray(counts), np.ascontiguousarray(means),
                   np.ascontiguousarray(variances * counts[:, None]), mean, var)
    return Moments(np.full(channels, counts.sum()), mean, var)


def batch_norm_apply(x, gamma, beta, mean, invstd, axis=-1, *, out=None):
    """``y = (x - mean) * invstd * gamma + beta``, one pass (training or inference).

    Parameters
    ----------
    x : ndarray
    gamma, beta : ndarray of shape (C,) or None
    mean, invstd : ndarray of shape (C,)
        The statistics to normalize with (batch, merged, or moving ones).
    axis : int, default -1
    out : ndarray, optional

    Returns
    -------
    ndarray
        Shape and dtype of ``x``.
    """
    x, axis = check.batch_input(x, axis)
    channels = x.shape[axis]
    gamma = check.channel_vector(gamma, "gamma", channels, optional=True)
    beta = check.channel_vector(beta, "beta", channels, optional=True)
    mean = check.channel_vector(mean, "mean", channels)
    invstd = check.channel_vector(invstd, "invstd", channels)
    out = check.out_array(out, x.shape, x.dtype, [x])
    scale = invstd if gamma is None else invstd * gamma
    offset = np.zeros(channels) if beta is None else beta
    y = backend.affine(_kernel_dtype(x), axis, mean, scale, offset,
                       _direct_out(out, x, backend))
    return _result(y, x.dtype, out, None)


def batch_norm_grad_sums(dy, x, mean, axis=-1):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` in float64, one pass.

    Returns
    -------
    ndarray of shape (2, C)
        Sums of several parts of a batch add up (in a fixed order for reproducibility).
    """
    x, axis = check.batch_input(x, axis)
    dy = check.same_as_x(dy, x, "dy")
    mean = check.channel_vector(mean, "mean", x.shape[axis])
    return np.stack(backend.grad_sums(_kernel_dtype(dy), _kernel_dtype(x), axis, mean))


def batch_norm_grad_input(dy, x, gamma, mean, invstd, sums, count, axis=-1, *, out=None):
    """``dx`` of batch norm given the batch's gradient sums and element count.

    ``dx = gamma * invstd * (dy - sum_dy / n - (x - mean) * invstd**2 * sum_dy_xmu / n)``
    with ``sums = (sum_dy, sum_dy_xmu)`` and ``n = count`` taken over the whole
    (possibly multi-replica) batch.

    Returns
    -------
    ndarray
        Shape and dtype of ``x``.
    """
    x, axis = check.batch_input(x, axis)
    dy = check.same_as_x(dy, x, "dy")
    channels = x.shape[axis]
    gamma = check.channel_vector(gamma, "gamma", channels, optional=True)
    mean = check.channel_vector(mean, "mean", channels)
    invstd = check.channel_vector(invstd, "invstd", channels)
    sums = np.asarray(sums, dtype=np.float64)
    if sums.shape != (2, channels):
        raise ValueError(f"sums must have shape (2, {channels}); got {sums.shape}")
    count = np.broadcast_to(np.asarray(count, dtype=np.float64), (channels,))
    out = check.out_array(out, x.shape, x.dtype, [x, dy])
    _, k_dy, mean_dy, k_x = backend.grad_coeffs(sums[0], sums[1], invstd, gamma, count)
    dx = backend.grad_input(_kernel_dtype(dy), _kernel_dtype(x), axis, mean, k_dy, mean_dy,
                            k_x, _direct_out(out, x, backend))
    return _result(dx, x.dtype, out, None)
