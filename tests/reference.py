"""Float64 NumPy reference: the oracle for every kernel test.

Written independently of numbabn's kernels: statistics by NumPy's two-pass mean and
variance on a float64 copy, the backward by the chain rule step by step through the
computational graph (the cs231n derivation, corrected), not by the closed form the
kernels use.
"""

import numpy as np


def _to_rows(a, axis):
    """float64 (M, C) copy with the channel axis last."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    return a.reshape(-1, a.shape[-1])


def _from_rows(rows, shape, axis):
    moved = list(shape)
    channels = moved.pop(axis % len(shape))
    return np.moveaxis(rows.reshape(moved + [channels]), -1, axis)


def _param(v, channels, default):
    return np.full(channels, default) if v is None else np.asarray(v, dtype=np.float64)


def stats(x, axis):
    rows = _to_rows(x, axis)
    mean = rows.mean(axis=0)
    var = ((rows - mean) ** 2).mean(axis=0)
    return mean, var


def train(x, gamma, beta, axis, eps):
    """(y, mean, var) in float64."""
    rows = _to_rows(x, axis)
    channels = rows.shape[1]
    mean, var = stats(x, axis)
    y = (rows - mean) / np.sqrt(var + eps) * _param(gamma, channels, 1.0) + _param(beta, channels, 0.0)
    return _from_rows(y, np.shape(x), axis), mean, var


def inference(x, gamma, beta, moving_mean, moving_var, axis, eps):
    rows = _to_rows(x, axis)
    channels = rows.shape[1]
    y = ((rows - np.asarray(moving_mean, np.float64)) / np.sqrt(np.asarray(moving_var, np.float64) + eps)
         * _param(gamma, channels, 1.0) + _param(beta, channels, 0.0))
    return _from_rows(y, np.shape(x), axis)


def backward(dy, x, gamma, axis, eps):
    """(dx, dgamma, dbeta) in float64, by the chain rule through the forward graph."""
    xr = _to_rows(x, axis)
    dout = _to_rows(dy, axis)
    n, channels = xr.shape
    g = _param(gamma, channels, 1.0)
    # forward graph
    mu = xr.mean(axis=0)
    xmu = xr - mu
    var = (xmu ** 2).mean(axis=0)
    sqrtvar = np.sqrt(var + eps)
    ivar = 1.0 / sqrtvar
    xhat = xmu * ivar
    # backward, node by node
    dbeta = dout.sum(axis=0)
    dgamma = (dout * xhat).sum(axis=0)
    dxhat = dout * g
    divar = (dxhat * xmu).sum(axis=0)
    dxmu1 = dxhat * ivar
    dsqrtvar = -divar / sqrtvar ** 2
    dvar = 0.5 / sqrtvar * dsqrtvar
    dsq = np.ones_like(xr) / n * dvar
    dxmu2 = 2.0 * xmu * dsq
    dx1 = dxmu1 + dxmu2
    dmu = -dx1.sum(axis=0)
    dx = dx1 + dmu / n
    return _from_rows(dx, np.shape(x), axis), dgamma, dbeta
