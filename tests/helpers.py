import os
import subprocess
import sys
import textwrap

import numpy as np

from cases import tolerance


def assert_close(actual, expected, dtype, cond=1.0, err_msg=""):
    """Elementwise check scaled to the array's magnitude, at the storage dtype's precision.

    ``cond`` is the conditioning of normalization, |mean| / std: float64 data carry an
    error of about ``eps64 * cond`` into ``x - mean`` in any implementation, the reference
    included (float32 data are exact in the kernels' float64 arithmetic).
    """
    expected = np.asarray(expected, dtype=np.float64)
    tol = tolerance(dtype) + 4e-16 * cond
    scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(np.asarray(actual, dtype=np.float64), expected,
                               rtol=tol, atol=tol * scale, err_msg=err_msg)


def assert_sums_close(actual, expected, terms, err_msg=""):
    """Per-channel float64 sums: allow float64 rounding growing with the number of terms."""
    expected = np.asarray(expected)
    np.testing.assert_allclose(actual, expected, rtol=1e-10,
                               atol=1e-13 * terms * max(1.0, float(np.max(np.abs(expected)))),
                               err_msg=err_msg)


def c_entry_point_ops(element, shape, axis, step=1, in_place=False):
    """``(train, backward)`` through numbabn's C entry points for ``element`` ("float32",
    "float64", "uint16", "int16"), driven as numbabn's TensorFlow op drives them, but
    one task per call, in order (``step=1``) or in reverse (``step=-1``):
    ``train(x, gamma, beta, eps) -> (y, mean, var, invstd)`` and
    ``backward(dy, x, gamma, mean, invstd) -> (dx, dgamma, dbeta)`` on C-ordered arrays;
    ``in_place``: ``y`` written over (a copy of) ``x`` and ``dx`` over (a copy of) ``dy``,
    as the op does with a buffer it takes over."""
    import ctypes

    from numbabn._kernels_cpu import c_entry_points

    ep = c_entry_points(element)
    P, I, D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double

    def fn(name, *argtypes):
        return ctypes.CFUNCTYPE(None, *argtypes)(ep[name])

    plan = fn("plan", I, I, I, P)
    stats = fn("stats", P, I, I, I, I, I, P, P, P)
    train_coeffs = fn("train_coeffs", P, P, P, I, I, P, D, P, P, P, P)
    affine = fn("affine", P, P, I, I, I, I, I, P, P, P)
    grad_sums = fn("grad_sums", P, P, I, I, I, I, I, P, P, P)
    grad_coeffs = fn("grad_coeffs", P, P, I, I, I, P, P, P, P, P, P, P)
    grad_input = fn("grad_input", P, P, P, I, I, I, I, I, P, P, P, P)
    ax = axis % len(shape)
    outer, C = int(np.prod(shape[:ax])), shape[ax]
    inner = int(np.prod(shape[ax + 1:]))
    sizes = np.empty(3, np.int64)
    plan(outer, C, inner, sizes.ctypes.data)
    tasks, parts, elementwise = (int(v) for v in sizes)

    def order(n):
        return range(n) if step == 1 else range(n - 1, -1, -1)

    def ptr(a):
        assert a.flags.c_contiguous
        return a.ctypes.data

    def train(x, gamma, beta, eps):
        if in_place:
            x = y = x.copy()
        else:
            y = np.empty_like(x)
        counts, pmean, pm2 = np.empty(parts), np.empty((parts, C)), np.empty((parts, C))
        mean, var, invstd, scale = (np.empty(C) for _ in range(4))
        gamma, beta = np.ascontiguousarray(gamma, np.float64), np.ascontiguousarray(beta, np.float64)
        for t in order(tasks):
            stats(ptr(x), outer, C, inner, t, t + 1, ptr(counts), ptr(pmean), ptr(pm2))
        train_coeffs(ptr(counts), ptr(pmean), ptr(pm2), parts, C, ptr(gamma), eps, ptr(mean),
                     ptr(var), ptr(invstd), ptr(scale))
        for t in order(elementwise):
            affine(ptr(x), ptr(y), outer, C, inner, t, t + 1, ptr(mean), ptr(scale), ptr(beta))
        return y, mean, var, invstd

    def backward(dy, x, gamma, mean, invstd):
        if in_place:
            dy = dx = dy.copy()
        else:
            dx = np.empty_like(x)
        p1, p2 = np.empty((parts, C)), np.empty((parts, C))
        dgamma, dbeta, k_dy, mean_dy, k_x = (np.empty(C) for _ in range(5))
        gamma = np.ascontiguousarray(gamma, np.float64)
        for t in order(tasks):
            grad_sums(ptr(dy), ptr(x), outer, C, inner, t, t + 1, ptr(mean), ptr(p1), ptr(p2))
        grad_coeffs(ptr(p1), ptr(p2), parts, C, outer * inner, ptr(invstd), ptr(gamma),
                    ptr(dgamma), ptr(dbeta), ptr(k_dy), ptr(mean_dy), ptr(k_x))
        for t in order(elementwise):
            grad_input(ptr(dy), ptr(x), ptr(dx), outer, C, inner, t, t + 1, ptr(mean),
                       ptr(k_dy), ptr(mean_dy), ptr(k_x))
        return dx, dgamma, dbeta

    return train, backward


def run_python(code, **env):
    """Run ``code`` (dedented) in a fresh interpreter with ``env`` added to the
    environment and the repository and tests/ importable; the CompletedProcess."""
    full = dict(os.environ, **env)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    full["PYTHONPATH"] = os.pathsep.join([root, os.path.join(root, "tests"),
                                          full.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=full,
                          capture_output=True, text=True, timeout=300)
