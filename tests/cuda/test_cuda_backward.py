"""GPU backward pass and moving statistics against the float64 reference."""

import numpy as np
import pytest

import numbabn as nbn
import reference as ref
from cases import make_inputs
from cuda_helpers import dev, host
from helpers import assert_close, assert_sums_close
from numbabn import _device

CASES = [((20, 3), -1), ((6, 5), 0), ((3, 4, 5, 2), -1), ((3, 2, 4, 5), 1), ((2, 11, 3), -1)]
IDS = ["x".join(map(str, s)) + f"-ax{a}" for s, a in CASES]


@pytest.mark.parametrize("scaled", [True, False], ids=["gamma", "no-gamma"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_backward_matches_chain_rule(shape, axis, dtype, scaled):
    x, dy, gamma, beta = make_inputs(shape, axis, dtype, seed=11, loc=-2.0, scale=3.0)
    if not scaled:
        gamma = None
    xd = dev(x)
    _, stats = nbn.batch_norm_train(xd, gamma, beta, axis=axis, eps=1e-3)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dev(dy), xd, gamma, stats, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy, x, gamma, axis, 1e-3)
    assert all(_device.is_device_array(a) for a in (dx, dgamma, dbeta))
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert dgamma.dtype == dbeta.dtype == np.float64
    assert_close(host(dx), dx_ref, dtype)
    terms = x.size // shape[axis]
    assert_sums_close(host(dgamma), dgamma_ref, terms)
    assert_sums_close(host(dbeta), dbeta_ref, terms)


def test_backward_with_host_stats_and_gamma():
    """Per-channel inputs from the host (a CPU forward's stats) are copied to the GPU."""
    x, dy, gamma, _ = make_inputs((3, 4, 5, 2), -1, np.float32, seed=12)
    _, stats = nbn.batch_norm_train(x, gamma)  # on the CPU: NumPy stats
    dx, dgamma, dbeta = nbn.batch_norm_backward(dev(dy), dev(x), gamma, stats)
    dx_cpu, dgamma_cpu, dbeta_cpu = nbn.batch_norm_backward(dy, x, gamma, stats)
    assert_close(host(dx), dx_cpu, np.float32)
    np.testing.assert_allclose(host(dgamma), dgamma_cpu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(dbeta), dbeta_cpu, rtol=1e-12, atol=1e-12)


def test_backward_of_constant_channel_is_finite():
    x = np.full((20, 3), 1e4, np.float32)
    x[:, 1] = np.arange(20)
    dy = np.random.default_rng(14).standard_normal(x.shape).astype(np.float32)
    _, stats = nbn.batch_norm_train(dev(x))
    dx, dgamma, _ = nbn.batch_norm_backward(dev(dy), dev(x), None, stats)
    dx, dgamma = host(dx), host(dgamma)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dgamma))
    expected = (dy[:, 0].astype(np.float64) - dy[:, 0].mean(dtype=np.float64)) / np.sqrt(1e-3)
    np.testing.assert_allclose(dx[:, 0], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("moving_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stats_on", ["gpu", "host"])
def test_update_moving_stats_in_place_on_the_gpu(moving_dtype, stats_on):
    x, *_ = make_inputs((50, 4), -1, np.float32, seed=4)
    if stats_on == "gpu":
        _, stats = nbn.batch_norm_train(dev(x))
    else:
        _, stats = nbn.batch_norm_train(x)
    mm, mv = dev(np.zeros(4, moving_dtype)), dev(np.ones(4, moving_dtype))
    result = nbn.update_moving_stats(mm, mv, stats, momentum=0.9)
    assert result[0] is mm and result[1] is mv
    _, mean_ref, var_ref = ref.train(x, None, None, -1, 1e-3)
    rtol = 1e-6 if moving_dtype == np.float32 else 1e-12
    np.testing.assert_allclose(host(mm), 0.1 * mean_ref, rtol=rtol)
    np.testing.assert_allclose(host(mv), 0.9 + 0.1 * var_ref, rtol=rtol)
    assert host(mm).dtype == moving_dtype
