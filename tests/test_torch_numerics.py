"""Batch variance of large-mean float32 data: numbabn against PyTorch's CPU kernel.

Each channel's variance relative to a float64 two-pass reference on the same float32
values. numbabn's shifted float64 sums get it to float64 accuracy; PyTorch's CPU kernel
loses digits as the mean grows against the spread (here 1e-8 to 1e-5 against ~1e-15
to ~1e-13 for numbabn, which stays within float64 rounding of the mean). Both errors are printed (``-s``)
and recorded as test properties; the README quotes them.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_cases  # noqa: E402,F401 - one thread for PyTorch, as the other torch tests
from torch_cases import path  # noqa: E402,F401 - the fixture

# on both eager CPU paths (the compiled op and the Python path)
pytestmark = pytest.mark.usefixtures("path")

import numbabn.torch as nbt  # noqa: E402

CASES = [(1e4, 1.0), (1e5, 0.1)]


def _relative_error(var, reference):
    return float(np.max(np.abs(np.asarray(var, dtype=np.float64) - reference) / reference))


@pytest.mark.parametrize("loc, scale", CASES, ids=["1e4+N(0,1)", "1e5+0.1N(0,1)"])
def test_batch_variance_of_large_mean_data(loc, scale, record_property):
    g = torch.Generator().manual_seed(0)
    shape = (32, 4, 56, 56)
    x = (loc + scale * torch.randn(shape, generator=g, dtype=torch.float64)).float()
    x64 = x.double().numpy()
    # two-pass in float64 after an exact shift (float32 values within a factor of 2 of
    # each other subtract exactly in float64): the shift keeps 1e5 out of the sums, so
    # the reference is good to ~1e-16, not ~1e-10 as without it
    reference = (x64 - x64.flat[0]).var(axis=(0, 2, 3))
    n = x.numel() // shape[1]

    ours = nbt.BatchNorm2d(4, momentum=1.0)  # momentum 1: running_var = the batch's
    stock = torch.nn.BatchNorm2d(4, momentum=1.0)
    ours(x)
    stock(x)
    # the running variance is stored in float32 (unbiased): compare the kernels' own
    # float64 result for ours, and torch's float32 one as torch gives it
    _, _, var, _ = torch.ops.numbabn.batch_norm_train(x, None, None, 1e-5)
    ours_error = _relative_error(var.numpy(), reference)
    torch_error = _relative_error(stock.running_var.double().numpy() * (n - 1) / n, reference)
    ours_running = _relative_error(ours.running_var.double().numpy() * (n - 1) / n, reference)
    print(f"\nvariance of float32 {loc:g} + {scale:g} N(0,1), shape {shape}: relative error "
          f"numbabn {ours_error:.1e} (its float32 running_var {ours_running:.1e}), "
          f"torch CPU {torch_error:.1e}")
    record_property("numbabn_relative_error", ours_error)
    record_property("torch_relative_error", torch_error)
    # float64 rounding of values near ``loc`` (the per-task means Chan's rule merges)
    # against a spread of ``scale``: the conditioning bound helpers.assert_close uses
    assert ours_error <= 4e-16 * loc / scale
    assert ours_running <= 2 ** -23  # one float32 rounding of the stored value
    assert ours_error <= torch_error
