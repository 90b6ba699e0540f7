"""cs231n-style API: teaching code written against the seeds runs unchanged."""

import numpy as np
import pytest

import reference as ref
from numbabn import compat


def test_batchnorm_forward_train_and_test():
    rng = np.random.default_rng(31)
    N, D = 200, 5
    gamma, beta = rng.uniform(0.5, 2, D), rng.standard_normal(D)
    bn_param = {"mode": "train"}
    for _ in range(50):  # the seeds' running-average loop
        x = 3 + 2 * rng.standard_normal((N, D))
        out, cache = compat.batchnorm_forward(x, gamma, beta, bn_param)
        out_ref, _, _ = ref.train(x, gamma, beta, -1, 1e-5)
        np.testing.assert_allclose(out, out_ref, rtol=1e-12, atol=1e-12)
    # running statistics approach the population's (mean 3, var 4), from zeros and ones
    np.testing.assert_allclose(bn_param["running_mean"], 3, atol=0.2)
    np.testing.assert_allclose(bn_param["running_var"], 4, atol=0.6)

    bn_param["mode"] = "test"
    x = 3 + 2 * rng.standard_normal((N, D))
    out, cache = compat.batchnorm_forward(x, gamma, beta, bn_param)
    assert cache is None
    expected = ref.inference(x, gamma, beta, bn_param["running_mean"], bn_param["running_var"],
                             -1, 1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_running_stats_start_at_zero_and_one_and_update_in_place():
    x = np.random.default_rng(32).standard_normal((10, 3))
    bn_param = {"mode": "train", "momentum": 0.5}
    compat.batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    mean, var = ref.stats(x, -1)
    np.testing.assert_allclose(bn_param["running_mean"], 0.5 * mean)
    np.testing.assert_allclose(bn_param["running_var"], 0.5 + 0.5 * var)
    running_mean = bn_param["running_mean"]
    compat.batchnorm_forward(x, np.ones(3), np.zeros(3), bn_param)
    assert bn_param["running_mean"] is running_mean  # the caller's array, updated in place


def test_batchnorm_backward_and_alias():
    rng = np.random.default_rng(33)
    x, dout = rng.standard_normal((30, 4)), rng.standard_normal((30, 4))
    gamma, beta = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    _, cache = compat.batchnorm_forward(x, gamma, beta, {"mode": "train"})
    dx, dgamma, dbeta = compat.batchnorm_backward(dout, cache)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dout, x, gamma, -1, 1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-10)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-10)
    assert compat.batchnorm_backward_alt is compat.batchnorm_backward


def test_spatial_forward_backward():
    rng = np.random.default_rng(34)
    N, C, H, W = 4, 3, 5, 6
    x, dout = 5 + rng.standard_normal((N, C, H, W)), rng.standard_normal((N, C, H, W))
    gamma, beta = rng.uniform(0.5, 2, C), rng.standard_normal(C)
    bn_param = {"mode": "train", "eps": 1e-5}
    out, cache = compat.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    np.testing.assert_allclose(out, ref.train(x, gamma, beta, 1, 1e-5)[0], rtol=1e-12, atol=1e-12)
    assert bn_param["running_mean"].shape == (C,)
    dx, dgamma, dbeta = compat.spatial_batchnorm_backward(dout, cache)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dout, x, gamma, 1, 1e-5)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-10)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-10)
    bn_param["mode"] = "test"
    out, _ = compat.spatial_batchnorm_forward(x, gamma, beta, bn_param)
    expected = ref.inference(x, gamma, beta, bn_param["running_mean"], bn_param["running_var"], 1,
                             1e-5)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


def test_compat_errors():
    x = np.ones((4, 3))
    with pytest.raises(ValueError, match="bn_param\\['mode'\\] is required"):
        compat.batchnorm_forward(x, np.ones(3), np.zeros(3), {})
    with pytest.raises(ValueError, match="Invalid forward batchnorm mode 'eval'"):
        compat.batchnorm_forward(x, np.ones(3), np.zeros(3), {"mode": "eval"})
    with pytest.raises(TypeError, match="cache must be the cache"):
        compat.batchnorm_backward(x, None)
    bn_param = {"mode": "train"}
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        compat.batchnorm_forward(np.ones(3), np.ones(3), np.zeros(3), bn_param)
    assert "running_mean" not in bn_param  # nothing half-done on error
