"""The NumPy peer: batch normalization as a NumPy user writes it without numbabn.

Vectorized array expressions over the reduced axes, in the input's precision (float16
computes in float32, as every batch-norm implementation does): ``x.mean``/``x.var``
(NumPy's two-pass variance with pairwise sums), ``(x - mean) * invstd * gamma + beta``,
and the closed-form backward ``dx = gamma * invstd / n * (n dy - sum dy - xhat sum(dy
xhat))``. Each expression makes a full-size temporary, which is the point of the
comparison: this is the cost numbabn's fused passes avoid.

asv imports every module here while discovering benchmarks: no ``time_*`` names.
"""

import numpy as np


def numpy_ops(inp, eps):
    """Zero-argument callables ``{"train", "inference", "backward", "stats"}`` on ``inp``.

    ``inp`` is a `_common.make_inputs` dict. Outputs are allocated on every call and
    returned in x's dtype; ``train`` returns ``(y, mean, var)``, ``backward``
    ``(dx, dgamma, dbeta)`` and ``stats`` ``(mean, var)``, the statistics in the compute
    precision.
    """
    x, dy, axis = inp["x"], inp["dy"], inp["axis"]
    dt = np.result_type(x.dtype, np.float32)  # float16 -> float32, the others as they are
    red = tuple(a for a in range(x.ndim) if a != axis)
    n = x.size // x.shape[axis]
    shape = [1] * x.ndim
    shape[axis] = -1
    gamma, beta, mm, mv = (inp[k].astype(dt).reshape(shape) for k in
                           ("gamma", "beta", "moving_mean", "moving_var"))
    # what the forward pass keeps for the backward, as a training loop would
    mean0 = x.mean(axis=red, dtype=dt, keepdims=True)
    invstd0 = 1 / np.sqrt(x.var(axis=red, dtype=dt, keepdims=True) + dt.type(eps))

    def stats():
        return (x.mean(axis=red, dtype=dt, keepdims=True),
                x.var(axis=red, dtype=dt, keepdims=True))

    def train():
        mean, var = stats()
        y = (x - mean) * (1 / np.sqrt(var + dt.type(eps))) * gamma + beta
        return y.astype(x.dtype, copy=False), mean, var

    def inference():
        y = (x - mm) * (1 / np.sqrt(mv + dt.type(eps))) * gamma + beta
        return y.astype(x.dtype, copy=False)

    def backward():
        g = dy.astype(dt, copy=False)  # float16 * n overflows (n > 65504 / |dy|)
        xhat = (x - mean0) * invstd0
        dbeta = g.sum(axis=red, keepdims=True)
        dgamma = (g * xhat).sum(axis=red, keepdims=True)
        dx = (gamma * invstd0 / n) * (n * g - dbeta - xhat * dgamma)
        return dx.astype(x.dtype, copy=False), dgamma, dbeta

    return {"train": train, "inference": inference, "backward": backward, "stats": stats}
