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
