"""The float64 value of each output of the kernels' elementwise passes.

A plain module (see cases.py). The kernels compute every output in float64 and round
it once to the storage dtype; these functions recompute that float64 value with the
same IEEE operations in the same order (no fused multiply-add: the kernels have no
fastmath), from the statistics a call returned. So an output of any dtype is, bit for
bit, the value here rounded once (NumPy's cast to float32 rounds once; tests/halves.py
rounds to the half formats). Used by tests/test_half.py, tests/test_layouts.py and the
CUDA bfloat16 tests.
"""

import numpy as np

#: the eps the tests that use these functions pass to the kernels
EPS = 1e-3


def _bcast(v, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, np.float64).reshape(shape)


def exact_train(x, gamma, beta, axis, stats):
    b = lambda v: _bcast(v, x.ndim, axis)  # noqa: E731
    scale = stats.invstd * gamma
    return (x.astype(np.float64) - b(stats.mean)) * b(scale) + b(beta)


def exact_inference(x, gamma, beta, mm, mv, axis, eps=EPS):
    b = lambda v: _bcast(v, x.ndim, axis)  # noqa: E731
    scale = (1.0 / np.sqrt(mv + eps)) * gamma
    return (x.astype(np.float64) - b(mm)) * b(scale) + b(beta)


def exact_backward(dy, x, gamma, axis, stats, dgamma, dbeta):
    b = lambda v: _bcast(v, x.ndim, axis)  # noqa: E731
    n = x.size // x.shape[axis]
    k_dy = stats.invstd * gamma
    k_x = k_dy * stats.invstd * dgamma / n
    return (b(k_dy) * (dy.astype(np.float64) - b(dbeta / n))
            - b(k_x) * (x.astype(np.float64) - b(stats.mean)))
