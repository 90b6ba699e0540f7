"""cs231n-style batch normalization with the call shapes of the seeds' tutorials.

Teaching code written against ``batchnorm_forward(x, gamma, beta, bn_param)`` and
``batchnorm_backward(dout, cache)`` runs unchanged on the numbabn kernels, minus the
tutorials' bugs: the running variance starts at ones (not zeros), the normalization
divides by ``sqrt(var + eps)`` (not ``sigma + eps``), and the backward is the correct
closed form. ``bn_param`` keeps the cs231n meaning: ``'mode'`` (``'train'`` or
``'test'``, required), ``'eps'`` (default 1e-5), ``'momentum'`` (default 0.9,
``running = momentum * running + (1 - momentum) * batch``), ``'running_mean'`` and
``'running_var'``, created on first use and then updated in place.
"""

from typing import NamedTuple

import numpy as np

from . import _validation as check
from .batchnorm import (
    BatchStats,
    batch_norm_backward,
    batch_norm_inference,
    batch_norm_train,
    update_moving_stats,
)

__all__ = [
    "batchnorm_backward",
    "batchnorm_backward_alt",
    "batchnorm_forward",
    "spatial_batchnorm_backward",
    "spatial_batchnorm_forward",
]


class Cache(NamedTuple):
    """What the backward pass needs: the input, gamma and the batch statistics."""

    x: np.ndarray
    gamma: np.ndarray
    stats: BatchStats
    axis: int


def _forward(x, gamma, beta, bn_param, axis):
    if not isinstance(bn_param, dict):
        raise TypeError(f"bn_param must be a dict; got {type(bn_param).__name__}")
    if "mode" not in bn_param:
        raise ValueError("bn_param['mode'] is required: 'train' or 'test'")
    mode = bn_param["mode"]
    eps = bn_param.get("eps", 1e-5)
    momentum = bn_param.get("momentum", 0.9)
    x, axis = check.batch_input(x, axis)  # before bn_param gets running arrays
    channels = x.shape[axis]
    running_mean = bn_param.setdefault("running_mean", np.zeros(channels, dtype=x.dtype))
    running_var = bn_param.setdefault("running_var", np.ones(channels, dtype=x.dtype))

    if mode == "train":
        out, stats = batch_norm_train(x, gamma, beta, axis=axis, eps=eps)
        update_moving_stats(running_mean, running_var, stats, momentum=momentum)
        return out, Cache(x, gamma, stats, axis)
    if mode == "test":
        out = batch_norm_inference(x, gamma, beta, running_mean, running_var, axis=axis,
                                   eps=eps)
        return out, None
    raise ValueError(f"Invalid forward batchnorm mode {mode!r}; expected 'train' or 'test'")


def _backward(dout, cache):
    if not isinstance(cache, Cache):
        raise TypeError("cache must be the cache returned by a forward pass in 'train' mode")
    return batch_norm_backward(dout, cache.x, cache.gamma, cache.stats, axis=cache.axis)


def batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalization of (N, D) data, cs231n style.

    Parameters
    ----------
    x : ndarray, shape (N, D)
    gamma, beta : ndarray, shape (D,)
    bn_param : dict
        ``'mode'`` is required; see the module docstring for the other keys.

    Returns
    -------
    out : ndarray, shape (N, D)
    cache : Cache or None
        For `batchnorm_backward` (``None`` in test mode).
    """
    return _forward(x, gamma, beta, bn_param, axis=-1)


def batchnorm_backward(dout, cache):
    """Gradients of `batchnorm_forward`: ``(dx, dgamma, dbeta)``.

    Parameters
    ----------
    dout : ndarray, shape (N, D)
    cache : Cache
        From `batchnorm_forward` in train mode.

    Returns
    -------
    dx : ndarray, shape (N, D)
    dgamma, dbeta : ndarray, shape (D,)
    """
    return _backward(dout, cache)


#: cs231n's name for the closed-form backward; numbabn has only the closed form.
batchnorm_backward_alt = batchnorm_backward


def spatial_batchnorm_forward(x, gamma, beta, bn_param):
    """Batch normalization of (N, C, H, W) feature maps: statistics per channel over N, H, W.

    Runs directly on the channels-first layout: no transpose or reshape copies.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    gamma, beta : ndarray, shape (C,)
    bn_param : dict
        As in `batchnorm_forward`.

    Returns
    -------
    out : ndarray, shape (N, C, H, W)
    cache : Cache or None
    """
    return _forward(x, gamma, beta, bn_param, axis=1)


def spatial_batchnorm_backward(dout, cache):
    """Gradients of `spatial_batchnorm_forward`: ``(dx, dgamma, dbeta)``.

    Parameters
    ----------
    dout : ndarray, shape (N, C, H, W)
    cache : Cache
        From `spatial_batchnorm_forward` in train mode.

    Returns
    -------
    dx : ndarray, shape (N, C, H, W)
    dgamma, dbeta : ndarray, shape (C,)
    """
    return _backward(dout, cache)
