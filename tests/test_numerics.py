"""Statistics that stay accurate where E[x^2] - E[x]^2 (Keras, oneDNN) does not."""

import numpy as np
import pytest

import numbabn as nbn
import reference as ref

# the last: channels-first runs shorter than config.LANES (the short-run reductions)
LAYOUTS = [((4096, 8), -1), ((16, 8, 512), 1), ((8, 32, 32, 4), -1), ((8, 4, 32, 32), 1),
           ((256, 8, 4, 4), 1)]


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("loc,scale", [(1e4, 1.0), (1e5, 0.1), (-3e4, 2.0)])
def test_large_mean_float32_variance(shape, axis, loc, scale):
    rng = np.random.default_rng(21)
    x = (loc + scale * rng.standard_normal(shape)).astype(np.float32)
    _, stats = nbn.batch_norm_train(x, axis=axis)
    mean_ref, var_ref = ref.stats(x, axis)
    np.testing.assert_allclose(stats.var, var_ref, rtol=1e-6)
    np.testing.assert_allclose(stats.mean, mean_ref, rtol=1e-12)


def test_naive_formula_fails_where_we_do_not():
    """The check above can fail: E[x^2] - E[x]^2 in float32 misses by orders of magnitude."""
    x = (1e4 + np.random.default_rng(22).standard_normal((4096, 2))).astype(np.float32)
    naive = np.mean(x * x, axis=0) - np.mean(x, axis=0) ** 2
    var_ref = ref.stats(x, -1)[1]
    assert np.max(np.abs(naive / var_ref - 1)) > 1e-2
    np.testing.assert_allclose(nbn.batch_norm_train(x)[1].var, var_ref, rtol=1e-6)


@pytest.mark.parametrize("shape,axis", [((2 ** 21, 1), -1), ((1, 2, 2 ** 20), 1), ((2 ** 19, 4), -1)])
def test_long_reduction(shape, axis):
    """Millions of elements per channel, split across many tasks and merged."""
    x = (1e3 + np.random.default_rng(23).standard_normal(shape)).astype(np.float32)
    _, stats = nbn.batch_norm_train(x, axis=axis)
    mean_ref, var_ref = ref.stats(x, axis)
    np.testing.assert_allclose(stats.var, var_ref, rtol=1e-6)
    np.testing.assert_allclose(stats.mean, mean_ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("value", [1e4, 0.0, -3.5, 65504.0])
def test_constant_channel_normalizes_to_exactly_beta(dtype, shape, axis, value):
    rng = np.random.default_rng(24)
    x = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    index = [slice(None)] * len(shape)
    index[axis] = 1
    x[tuple(index)] = value
    beta = rng.standard_normal(channels)
    gamma = rng.uniform(0.5, 2, channels)
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis)
    assert stats.var[1] == 0.0
    assert stats.mean[1] == np.float64(dtype(value))
    assert np.all(y[tuple(index)] == dtype(beta[1]))
    assert np.all(stats.var >= 0)


def test_variance_never_negative_for_nearly_constant_data():
    rng = np.random.default_rng(25)
    for _ in range(20):
        base = rng.uniform(-1e5, 1e5)
        x = np.full((1000, 6), base, np.float32)
        flip = rng.random(x.shape) < 0.001
        x[flip] = np.nextafter(np.float32(base), np.float32(np.inf))
        _, stats = nbn.batch_norm_train(x)
        assert np.all(stats.var >= 0)
        np.testing.assert_allclose(stats.var, ref.stats(x, -1)[1], rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("shape,axis", LAYOUTS)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf_stay_in_their_channel(shape, axis, bad):
    rng = np.random.default_rng(26)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    index = [0] * len(shape)
    index[axis] = 2
    x[tuple(index)] = bad
    y, stats = nbn.batch_norm_train(x, axis=axis)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, None, stats, axis=axis)
    y_c = np.moveaxis(y, axis, -1)
    dx_c = np.moveaxis(dx, axis, -1)
    others = [c for c in range(shape[axis]) if c != 2]
    assert np.all(np.isnan(y_c[..., 2]))
    assert np.all(np.isfinite(y_c[..., others]))
    assert np.all(np.isfinite(dx_c[..., others]))
    assert np.all(np.isfinite(stats.var[others])) and np.isnan(stats.var[2])
    assert np.all(np.isfinite(dgamma[others])) and np.all(np.isfinite(dbeta))
