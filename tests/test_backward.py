"""Backward pass against the chain-rule reference and against finite differences."""

import numpy as np
import pytest

import numbabn as nbn
import reference as ref
from cases import make_inputs
from helpers import assert_close, assert_sums_close


@pytest.mark.parametrize("scaled", [True, False], ids=["gamma", "no-gamma"])
def test_backward_matches_chain_rule(case, dtype, scaled):
    shape, axis = case
    x, dy, gamma, beta = make_inputs(shape, axis, dtype, seed=11, loc=-2.0, scale=3.0)
    if not scaled:
        gamma = None
    _, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-3)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis=axis)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy, x, gamma, axis, 1e-3)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, dx_ref, dtype)
    terms = x.size // shape[axis]
    assert_sums_close(dgamma, dgamma_ref, terms)
    assert_sums_close(dbeta, dbeta_ref, terms)


@pytest.mark.parametrize("shape,axis", [((6, 3), -1), ((3, 2, 4, 4), 1), ((2, 3, 3, 2), -1),
                                        ((1, 4, 5), 1)])
def test_backward_matches_finite_differences(shape, axis):
    """Central differences of L = sum(w * y(x, gamma, beta)) in float64."""
    x, _, gamma, beta = make_inputs(shape, axis, np.float64, seed=12, loc=1.0, scale=2.0)
    w = np.random.default_rng(13).standard_normal(shape)
    eps = 1e-3

    def loss(x_, g_, b_):
        return float(np.sum(w * nbn.batch_norm_train(x_, g_, b_, axis=axis, eps=eps)[0]))

    _, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis, eps=eps)
    dx, dgamma, dbeta = nbn.batch_norm_backward(w, x, gamma, stats, axis=axis)

    def numeric(f, a):
        grad = np.empty_like(a)
        h = 1e-6
        for i in np.ndindex(a.shape):
            old = a[i]
            a[i] = old + h
            up = f()
            a[i] = old - h
            down = f()
            a[i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    np.testing.assert_allclose(dx, numeric(lambda: loss(x, gamma, beta), x), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dgamma, numeric(lambda: loss(x, gamma, beta), gamma), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(dbeta, numeric(lambda: loss(x, gamma, beta), beta), rtol=1e-5,
                               atol=1e-7)


def test_backward_of_constant_channel_is_finite():
    x = np.full((20, 3), 1e4, np.float32)
    x[:, 1] = np.arange(20)
    dy = np.random.default_rng(14).standard_normal(x.shape).astype(np.float32)
    _, stats = nbn.batch_norm_train(x)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, None, stats)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dgamma))
    # a constant channel's output is beta whatever x does nearby, up to the eps term:
    # its gradient is dy minus its mean, scaled by 1/sqrt(eps)
    expected = (dy[:, 0].astype(np.float64) - dy[:, 0].mean(dtype=np.float64)) / np.sqrt(1e-3)
    np.testing.assert_allclose(dx[:, 0], expected, rtol=1e-5, atol=1e-5)
