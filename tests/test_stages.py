"""numbabn.stages: the passes one by one compose to the whole, across split batches."""

import numpy as np
import pytest

import numbabn as nbn
import reference as ref
from numbabn import stages


@pytest.mark.parametrize("shape,axis", [((50, 4), -1), ((9, 3, 5, 5), 1), ((7, 6, 6, 2), -1)])
@pytest.mark.parametrize("loc", [0.0, 1e4])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_split_batch_equals_whole_batch(shape, axis, loc, dtype):
    rng = np.random.default_rng(41)
    x = (loc + rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    channels = shape[axis]
    gamma, beta = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
    cuts = [0, 1, 4, shape[0]]  # unequal parts, one of a single sample
    parts = [(x[a:b], dy[a:b]) for a, b in zip(cuts[:-1], cuts[1:])]

    total = stages.merge_moments([stages.batch_moments(xp, axis) for xp, _ in parts])
    mean_ref, var_ref = ref.stats(x, axis)
    assert np.all(total.count == x.size // channels)
    np.testing.assert_allclose(total.mean, mean_ref, rtol=1e-12)
    np.testing.assert_allclose(total.var, var_ref, rtol=1e-7)

    invstd = 1 / np.sqrt(total.var + 1e-3)
    y = np.concatenate([stages.batch_norm_apply(xp, gamma, beta, total.mean, invstd, axis)
                        for xp, _ in parts])
    y_whole, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis)
    np.testing.assert_allclose(y.astype(float), y_whole.astype(float), rtol=1e-6, atol=1e-5)

    sums = sum(stages.batch_norm_grad_sums(dp, xp, total.mean, axis) for xp, dp in parts)
    dx = np.concatenate([stages.batch_norm_grad_input(dp, xp, gamma, total.mean, invstd, sums,
                                                      total.count, axis) for xp, dp in parts])
    dx_whole = nbn.batch_norm_backward(dy, x, gamma, stats, axis=axis)[0]
    assert dx.dtype == x.dtype
    tol = 2e-3 if dtype == np.float16 else 1e-5
    np.testing.assert_allclose(dx.astype(float), dx_whole.astype(float), rtol=tol,
                               atol=tol * np.abs(dx_whole.astype(float)).max())


def test_merge_skips_empty_parts_and_checks_shapes():
    x = np.random.default_rng(42).standard_normal((10, 3))
    whole = stages.batch_moments(x)
    empty = stages.Moments(np.zeros(3), np.zeros(3), np.zeros(3))
    merged = stages.merge_moments([empty, whole, empty])
    np.testing.assert_array_equal(merged.mean, whole.mean)
    np.testing.assert_array_equal(merged.var, whole.var)
    with pytest.raises(ValueError, match=r"shape \(P, 3, C\)"):
        stages.merge_moments([whole.mean])
    with pytest.raises(ValueError, match="empty batch"):
        stages.merge_moments([empty])
    with pytest.raises(ValueError, match=r"sums must have shape \(2, 3\)"):
        stages.batch_norm_grad_input(x, x, None, whole.mean, whole.var, np.zeros((3, 3)), 10)
