"""Forward passes (training and inference) against the float64 reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbabn as nbn
import reference as ref
from cases import make_inputs
from helpers import assert_close


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
def test_train_matches_reference(case, dtype, affine):
    shape, axis = case
    x, _, gamma, beta = make_inputs(shape, axis, dtype, seed=1, loc=3.0, scale=2.0)
    if not affine:
        gamma = beta = None
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-3)
    y_ref, mean_ref, var_ref = ref.train(x, gamma, beta, axis, 1e-3)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, y_ref, dtype)
    np.testing.assert_allclose(stats.mean, mean_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var, var_ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(stats.invstd, 1 / np.sqrt(var_ref + 1e-3), rtol=1e-10)
    assert all(s.dtype == np.float64 and s.shape == (x.shape[axis],) for s in stats)


def test_inference_matches_reference(case, dtype):
    shape, axis = case
    x, _, gamma, beta = make_inputs(shape, axis, dtype, seed=2)
    channels = shape[axis]
    rng = np.random.default_rng(3)
    mm, mv = rng.standard_normal(channels), rng.uniform(0.1, 3.0, channels)
    y = nbn.batch_norm_inference(x, gamma, beta, mm, mv, axis=axis, eps=1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ref.inference(x, gamma, beta, mm, mv, axis, 1e-5), dtype)


def test_update_moving_stats_keras_convention():
    x, *_ = make_inputs((50, 4), -1, np.float32, seed=4)
    _, stats = nbn.batch_norm_train(x)
    mm = np.zeros(4, np.float32)
    mv = np.ones(4, np.float32)
    out = nbn.update_moving_stats(mm, mv, stats, momentum=0.9)
    assert out[0] is mm and out[1] is mv
    _, mean_ref, var_ref = ref.train(x, None, None, -1, 1e-3)
    np.testing.assert_allclose(mm, 0.1 * mean_ref, rtol=1e-6)
    np.testing.assert_allclose(mv, 0.9 + 0.1 * var_ref, rtol=1e-6)


def test_moving_stats_converge_to_population_stats():
    """Many updates with the same batch converge to its statistics (a loop users write)."""
    x, *_ = make_inputs((256, 3), -1, np.float64, seed=5, loc=2.0)
    mm, mv = np.zeros(3), np.ones(3)
    for _ in range(400):
        _, stats = nbn.batch_norm_train(x)
        nbn.update_moving_stats(mm, mv, stats, momentum=0.95)
    y = nbn.batch_norm_inference(x, None, None, mm, mv, eps=1e-3)
    y_train, _ = nbn.batch_norm_train(x)
    np.testing.assert_allclose(y, y_train, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=2, max_size=5),
    data=st.data(),
    dtype=st.sampled_from([np.float32, np.float64]),
    loc=st.sampled_from([0.0, -7.0, 1e3]),
    log_scale=st.floats(-3, 3),
)
def test_train_and_inference_random_shapes(shape, data, dtype, loc, log_scale):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x, _, gamma, beta = make_inputs(tuple(shape), axis, dtype, seed=len(shape),
                                    loc=loc, scale=10.0 ** log_scale)
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis)
    y_ref, mean_ref, var_ref = ref.train(x, gamma, beta, axis, 1e-3)
    cond = abs(loc) / 10.0 ** log_scale
    assert_close(y, y_ref, dtype, cond)
    np.testing.assert_allclose(stats.var, var_ref, rtol=1e-9, atol=1e-12 * loc ** 2)
    assert np.all(stats.var >= 0)
    y_inf = nbn.batch_norm_inference(x, gamma, beta, stats.mean, stats.var, axis=axis)
    assert_close(y_inf, y_ref, dtype, cond)
