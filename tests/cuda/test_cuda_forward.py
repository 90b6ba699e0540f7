"""GPU forward passes (training, inference) against the float64 reference."""

import numpy as np
import pytest

import numbabn as nbn
import reference as ref
from cases import make_inputs
from cuda_helpers import dev, host
from helpers import assert_close
from numbabn import _cuda, _device, config
from numbabn._layout import Layout, layout_of

# rows (channels contiguous) and planes (channels-first), dense and conv, one channel,
# a channel count that is not a power of two, more channels than a block's threads
CASES = [((20, 3), -1), ((6, 5), 0), ((3, 4, 5, 2), -1), ((3, 2, 4, 5), 1),
         ((2, 11, 3), -1), ((17, 1), -1)]
DTYPES = [np.float32, np.float64, np.float16]
IDS = ["x".join(map(str, s)) + f"-ax{a}" for s, a in CASES]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES, ids=IDS)
def test_train_matches_reference(shape, axis, dtype, affine):
    x, _, gamma, beta = make_inputs(shape, axis, dtype, seed=1, loc=3.0, scale=2.0)
    if not affine:
        gamma = beta = None
    y, stats = nbn.batch_norm_train(dev(x), gamma, beta, axis=axis, eps=1e-3)
    y_ref, mean_ref, var_ref = ref.train(x, gamma, beta, axis, 1e-3)
    assert _device.is_device_array(y) and y.shape == x.shape and y.dtype == x.dtype
    assert_close(host(y), y_ref, dtype)
    for s in stats:
        assert _device.is_device_array(s) and s.dtype == np.float64
        assert tuple(s.shape) == (shape[axis],)
    np.testing.assert_allclose(host(stats.mean), mean_ref, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(stats.var), var_ref, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(host(stats.invstd), 1 / np.sqrt(var_ref + 1e-3), rtol=1e-10)


@pytest.mark.parametrize("stats_on", ["host", "gpu-float32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", CASES[2:4], ids=IDS[2:4])
def test_inference_matches_reference(shape, axis, dtype, stats_on):
    x, _, gamma, beta = make_inputs(shape, axis, dtype, seed=2)
    rng = np.random.default_rng(3)
    channels = shape[axis]
    mm, mv = rng.standard_normal(channels), rng.uniform(0.1, 3.0, channels)
    if stats_on == "gpu-float32":  # float32 vectors are widened on the GPU
        mm, mv = mm.astype(np.float32), mv.astype(np.float32)
        args = dev(mm), dev(mv)
    else:
        args = mm, mv
    y = nbn.batch_norm_inference(dev(x), gamma, beta, *args, axis=axis, eps=1e-5)
    assert y.dtype == x.dtype
    assert_close(host(y), ref.inference(x, gamma, beta, mm, mv, axis, 1e-5), dtype)


@pytest.mark.parametrize("shape,axis", [((256, 2), -1), ((4, 2, 64), 1)])
@pytest.mark.parametrize("loc,scale", [(1e4, 1.0), (1e5, 0.1), (-3e4, 2.0)])
def test_large_mean_float32_variance(shape, axis, loc, scale):
    """Welford + Chan keep float64 accuracy where E[x^2] - E[x]^2 loses every digit."""
    x = (loc + scale * np.random.default_rng(21).standard_normal(shape)).astype(np.float32)
    _, stats = nbn.batch_norm_train(dev(x), axis=axis)
    mean_ref, var_ref = ref.stats(x, axis)
    np.testing.assert_allclose(host(stats.var), var_ref, rtol=1e-6)
    np.testing.assert_allclose(host(stats.mean), mean_ref, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((24, 3), -1), ((3, 3, 8), 1)])
@pytest.mark.parametrize("value", [1e4, -3.5])
def test_constant_channel_normalizes_to_exactly_beta(dtype, shape, axis, value):
    rng = np.random.default_rng(24)
    x = rng.standard_normal(shape).astype(dtype)
    index = [slice(None)] * len(shape)
    index[axis] = 1
    x[tuple(index)] = value
    beta = rng.standard_normal(shape[axis])
    gamma = rng.uniform(0.5, 2, shape[axis])
    y, stats = nbn.batch_norm_train(dev(x), gamma, beta, axis=axis)
    var, mean = host(stats.var), host(stats.mean)
    assert var[1] == 0.0 and mean[1] == np.float64(dtype(value))
    assert np.all(host(y)[tuple(index)] == dtype(beta[1]))
    assert np.all(var >= 0)


def test_variance_never_negative_for_nearly_constant_data():
    rng = np.random.default_rng(25)
    for _ in range(4):
        base = rng.uniform(-1e5, 1e5)
        x = np.full((40, 2), base, np.float32)
        x[rng.random(x.shape) < 0.05] = np.nextafter(np.float32(base), np.float32(np.inf))
        _, stats = nbn.batch_norm_train(dev(x))
        var = host(stats.var)
        assert np.all(var >= 0)
        np.testing.assert_allclose(var, ref.stats(x, -1)[1], rtol=1e-6, atol=1e-30)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # simulator's NumPy
@pytest.mark.parametrize("shape,axis", [((12, 4), -1), ((2, 4, 6), 1)])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_inf_stay_in_their_channel(shape, axis, bad):
    rng = np.random.default_rng(26)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    index = [0] * len(shape)
    index[axis] = 2
    x[tuple(index)] = bad
    y, stats = nbn.batch_norm_train(dev(x), axis=axis)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dev(dy), dev(x), None, stats, axis=axis)
    y_c, dx_c = np.moveaxis(host(y), axis, -1), np.moveaxis(host(dx), axis, -1)
    others = [c for c in range(shape[axis]) if c != 2]
    var, dgamma = host(stats.var), host(dgamma)
    assert np.all(np.isnan(y_c[..., 2])) and np.all(np.isfinite(y_c[..., others]))
    assert np.all(np.isfinite(dx_c[..., others]))
    assert np.all(np.isfinite(var[others])) and np.isnan(var[2])
    assert np.all(np.isfinite(dgamma[others])) and np.all(np.isfinite(host(dbeta)))


def test_same_bits_every_run():
    """No atomics and a split fixed by the shape: repeated calls agree bit for bit."""
    x, dy, gamma, beta = make_inputs((5, 3, 4, 2), 1, np.float32, seed=27)
    xd, dyd = dev(x), dev(dy)
    runs = []
    for _ in range(2):
        y, stats = nbn.batch_norm_train(xd, gamma, beta, axis=1)
        dx, dgamma, dbeta = nbn.batch_norm_backward(dyd, xd, gamma, stats, axis=1)
        runs.append([host(a) for a in (y, *stats, dx, dgamma, dbeta)])
    for a, b in zip(*runs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("shape,axis", [((70, 2), -1), ((3, 2, 25), 1)])
def test_stage_two_merges_more_partials_than_threads(monkeypatch, shape, axis):
    """With more blocks per channel than threads, stage-2 threads merge several partials."""
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 4)
    monkeypatch.setattr(config, "CUDA_MAX_BLOCKS_PER_CHANNEL", 64)
    monkeypatch.setattr(config, "CUDA_TARGET_BLOCKS", 64)
    monkeypatch.setattr(config, "CUDA_MIN_ELEMENTS_PER_THREAD", 1)
    x, dy, gamma, beta = make_inputs(shape, axis, np.float64, seed=28, loc=50.0)
    layout = layout_of(_device.shadow(dev(x)), axis % len(shape))
    assert _cuda.launch_plan(layout).blocks_per_channel > 8
    y, stats = nbn.batch_norm_train(dev(x), gamma, beta, axis=axis)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dev(dy), dev(x), gamma, stats, axis=axis)
    y_ref, mean_ref, var_ref = ref.train(x, gamma, beta, axis, 1e-3)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy, x, gamma, axis, 1e-3)
    assert_close(host(y), y_ref, np.float64, cond=50.0)
    np.testing.assert_allclose(host(stats.var), var_ref, rtol=1e-10)
    assert_close(host(dx), dx_ref, np.float64, cond=50.0)
    np.testing.assert_allclose(host(dgamma), dgamma_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(host(dbeta), dbeta_ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("outer,channels,inner", [(1000, 3, 1), (7, 64, 1), (5, 300, 1),
                                                  (64, 64, 3136), (2, 3, 5), (1, 1, 1)])
def test_launch_plan_from_shape_alone(outer, channels, inner):
    layout = Layout(perm=(0, 1, 2), outer=outer, channels=channels, inner=inner)
    plan = _cuda.launch_plan(layout)
    assert plan == _cuda.launch_plan(layout)
    threads = config.CUDA_THREADS_PER_BLOCK
    assert plan.threads == threads and np.prod(plan.block) == threads
    assert 1 <= plan.blocks_per_channel <= config.CUDA_MAX_BLOCKS_PER_CHANNEL
    total = outer if layout.is_rows else outer * inner
    # every block has work, and the blocks cover every element
    assert (plan.blocks_per_channel - 1) * plan.per_block < total
    assert plan.blocks_per_channel * plan.per_block >= total
    if layout.is_rows:  # a warp's threads read consecutive channels of a row
        tx = plan.block[0]
        assert tx >= min(channels, threads) and plan.grid[0] * tx >= channels
    else:
        assert plan.grid[0] == channels


def test_launch_plan_rejects_a_block_size_not_a_power_of_two(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS_PER_BLOCK", 96)
    with pytest.raises(ValueError, match="CUDA_THREADS_PER_BLOCK must be a power of two"):
        _cuda.launch_plan(Layout((0, 1), 10, 3, 1))
