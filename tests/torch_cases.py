"""Inputs, tolerances and the float64 oracle of the PyTorch tests (tests/test_torch_*.py).

A plain module (see cases.py for why not conftest). It imports torch: import it only
after ``pytest.importorskip("torch")``.
"""

import numpy as np
import pytest
import torch

from cases import tolerance as _numpy_tolerance
from helpers import assert_close as _assert_close

import numbabn.torch as nbt

# PyTorch's OpenMP threads spin while waiting: on a machine whose cores are busy (CI
# runners, this 2-core one) a small stock batch-norm step then takes ~65 ms instead of
# ~1 ms, and the oracle dominates the suite. The tests compare values, not speeds.
torch.set_num_threads(1)


@pytest.fixture(params=["native", "python"])
def path(request, monkeypatch):
    """Run a test on each of the modules' eager CPU paths: the compiled op
    (``numbabn.torch._native``, taken by default) and the Python path (taken without a
    compiler, and for strided, CUDA and traced input). Use it with
    ``pytestmark = pytest.mark.usefixtures("path")`` after importing it."""
    from numbabn.torch import _native, modules

    if request.param == "native":
        if not modules._NATIVE_ENABLED:
            pytest.skip("NUMBABN_TORCH_OP=0: the compiled op is switched off")
        assert _native.load() is not None, _native._state.get("why")
    else:
        monkeypatch.setattr(modules, "_NATIVE_ENABLED", False)
    return request.param


STOCK = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
OURS = {1: nbt.BatchNorm1d, 2: nbt.BatchNorm2d, 3: nbt.BatchNorm3d}

# (name, shape, module kind, memory format): every layout torch users have
LAYOUTS = [
    ("NC", (12, 5), 1, torch.contiguous_format),
    ("NCL", (4, 5, 7), 1, torch.contiguous_format),
    ("NCHW", (4, 5, 6, 7), 2, torch.contiguous_format),
    ("NHWC", (4, 5, 6, 7), 2, torch.channels_last),
    ("NCDHW", (3, 5, 4, 3, 6), 3, torch.contiguous_format),
    ("NDHWC", (3, 5, 4, 3, 6), 3, torch.channels_last_3d),
]
LAYOUT_IDS = [layout[0] for layout in LAYOUTS]

_ROUNDING = {torch.float64: np.float64, torch.float32: np.float32, torch.float16: np.float16}


def tolerance(dtype):
    """The kernels compute in float64 and round once to the storage dtype: cases.py's
    tolerances, and bfloat16's alike (8 significant bits where float16 has 11: 2**3
    times float16's)."""
    if dtype == torch.bfloat16:
        return 8 * _numpy_tolerance(np.float16)
    return _numpy_tolerance(_ROUNDING[dtype])


def assert_close(actual, expected, dtype, what):
    """``actual`` (any dtype) against a float64 ``expected`` at ``dtype``'s rounding."""
    a = actual.detach().to(torch.float64).cpu().numpy()
    e = expected.detach().to(torch.float64).cpu().numpy()
    if dtype == torch.bfloat16:
        tol = tolerance(dtype)
        scale = max(1.0, float(np.max(np.abs(e), initial=0.0)))
        np.testing.assert_allclose(a, e, rtol=tol, atol=tol * scale, err_msg=what)
    else:
        _assert_close(a, e, _ROUNDING[dtype], err_msg=what)


def make_x(shape, memory_format, dtype, seed, loc=1.0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    x = loc + scale * torch.randn(shape, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    if memory_format is not torch.contiguous_format:
        x = x.to(memory_format=memory_format)
    return x


def pair(kind, channels, dtype, seed=0, **options):
    """(ours in ``dtype``, stock torch in float64) with the same random affine parameters."""
    ours = OURS[kind](channels, dtype=dtype, **options)
    oracle = STOCK[kind](channels, dtype=torch.float64, **options)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        if ours.weight is not None:
            ours.weight.copy_(torch.empty(channels, dtype=torch.float64).uniform_(
                0.5, 2.0, generator=g))
            oracle.weight.copy_(ours.weight)
        if ours.bias is not None:
            ours.bias.copy_(torch.randn(channels, generator=g, dtype=torch.float64))
            oracle.bias.copy_(ours.bias)
    return ours, oracle


def step(module, x, dy):
    """One forward and backward: (y, dx, dweight, dbias) with fresh gradients."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)  # clone() keeps the memory format
    y = module(x)
    y.backward(dy)
    grads = [p.grad if p is not None else None for p in (module.weight, module.bias)]
    return y, x.grad, *grads
