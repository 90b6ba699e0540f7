"""Input cases and tolerances shared by the CPU tests and the GPU tests (tests/cuda/).

A plain module, not conftest.py: tests/ and tests/cuda/ each have a conftest.py, and
pytest imports both under the module name ``conftest``, so ``from conftest import``
would find whichever came last.
"""

import numpy as np

# (shape, channel axis): dense, channels-last and channels-first conv, 3-D and 5-D,
# a channel axis in the middle, one channel, odd channel counts, a single sample.
CASES = [
    ((64, 8), -1),
    ((7, 3), 0),
    ((5, 6, 7, 3), -1),
    ((5, 3, 6, 7), 1),
    ((4, 5, 7), -1),
    ((4, 7, 5), 1),
    ((3, 4, 5, 6, 7), -1),
    ((3, 7, 4, 5, 6), 1),
    ((2, 3, 129, 4), 2),
    ((33, 1), -1),
    ((2, 1, 40, 40), 1),
    ((1, 9, 1, 3), 1),
    ((1, 7), -1),
    ((4000, 3), -1),
    ((3, 5, 70, 70), 1),
]
DTYPES = [np.float32, np.float64, np.float16]


def case_id(case):
    shape, axis = case
    return "x".join(map(str, shape)) + f"-ax{axis}"


def make_inputs(shape, axis, dtype, seed, loc=0.0, scale=1.0):
    """Fresh random x, dy, gamma, beta (gamma, beta float64; x, dy in dtype)."""
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    x = (loc + scale * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, channels)
    beta = rng.standard_normal(channels)
    return x, dy, gamma, beta


def tolerance(dtype):
    """Output tolerance: the kernels round a float64 result once to the storage dtype."""
    return {np.dtype(np.float64): 1e-12, np.dtype(np.float32): 2e-6,
            np.dtype(np.float16): 2e-3}[np.dtype(dtype)]
