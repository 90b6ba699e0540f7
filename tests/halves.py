"""Half formats in the tests: exact rounding, bit views and the kernels' float64 results.

A plain module (see cases.py), shared by tests/test_half.py (the CPU kernels) and
tests/cuda/test_cuda_bfloat16.py (the CUDA kernels). Needs ml_dtypes: import it after
``pytest.importorskip("ml_dtypes")``.

`round_to` is an exact rounding written with ``frexp`` and ``rint`` (no conversion
routine involved); the ``exact_*`` functions recompute, with the same IEEE operations in
the same order as the kernels, the float64 value each output is that value rounded once
(see tests/test_half.py's docstring for what that promises); they live in exact.py, which
the float32 tests use too.
"""

import ml_dtypes
import numpy as np

from exact import EPS, exact_backward, exact_inference, exact_train  # noqa: F401 - re-exported

BF16 = np.dtype(ml_dtypes.bfloat16)
F16 = np.dtype(np.float16)
HALVES = [F16, BF16]

#: format -> (significand bits, smallest normal exponent, largest finite value)
FORMATS = {"float16": (11, -14, 65504.0), "bfloat16": (8, -126, float(ml_dtypes.finfo(BF16).max))}


def round_to(v, dtype):
    """float64 ``v`` rounded to nearest even in ``dtype``, exactly, as ``dtype`` bits."""
    p, emin, vmax = FORMATS[np.dtype(dtype).name]
    v = np.asarray(v, np.float64)
    finite = np.isfinite(v)
    _, e = np.frexp(np.where(finite, v, 1.0))
    ulp = np.ldexp(1.0, np.maximum(e - 1, emin) - (p - 1))
    with np.errstate(over="ignore"):  # beyond float64's range: inf, as it should be
        r = np.rint(np.where(finite, v, 0.0) / ulp) * ulp  # scaling by 2**k is exact
    r = np.where(np.abs(r) > vmax, np.copysign(np.inf, v), r)
    r = np.where(finite, r, v)
    with np.errstate(invalid="ignore"):
        return r.astype(dtype)  # exact: r is representable


def bits(a):
    return np.ascontiguousarray(a).view(np.uint16)


def assert_rounded(got, want64, what=""):
    """``got`` (half) is ``want64`` rounded once, bit for bit (any NaN for a NaN)."""
    want = round_to(want64, got.dtype)
    nan = np.isnan(np.asarray(want64, np.float64))
    np.testing.assert_array_equal(np.isnan(got.astype(np.float32)), nan, err_msg=what)
    np.testing.assert_array_equal(bits(got)[~nan], bits(want)[~nan], err_msg=what)


def every_pattern(dtype):
    return np.arange(1 << 16, dtype=np.uint16).view(dtype)
