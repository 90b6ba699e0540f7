"""bfloat16 GPU arrays: the CUDA kernels read and write bfloat16 (its int16 bits) themselves.

The same promises, checked the same way, as the CPU kernels' (tests/test_half.py): the
statistics against the float64 reference of the bfloat16 inputs, and every full-size
output bit for bit as its float64 result rounded once to nearest even (`round_to`,
recomputed from the statistics the GPU returned: ``exact_*``). Where the GPU computes
the very same float64 values as the CPU (inference: same per-channel maths, same
elementwise formula) its bits are also the CPU bfloat16 kernels' bits, and ml_dtypes'
rounding of the float64 values. Values on exact ties, in the subnormal range, past the
largest finite bfloat16 and NaN come through inference of ``x == 0`` (outputs ``beta``
exactly) and of every bit pattern with a unit scale (outputs ``x`` exactly).

Shapes are small: the simulator runs every CUDA thread as a Python thread.
"""

import numpy as np
import pytest

ml_dtypes = pytest.importorskip("ml_dtypes")

import numbabn as nbn  # noqa: E402
import reference as ref  # noqa: E402
from cuda_helpers import dev, host, transposed  # noqa: E402
from halves import (BF16, EPS, FORMATS, assert_rounded, bits, every_pattern,  # noqa: E402
                    exact_backward, exact_inference, exact_train, round_to)
from numbabn import _device  # noqa: E402


def bdev(a):
    """A bfloat16 host array on the GPU, made through its int16 bits (as the torch
    bridge makes them: a foreign array's interface cannot say bfloat16)."""
    a = np.asarray(a)
    return dev(a.view(np.int16)).view(BF16)


def _inputs(shape, axis, seed, loc=0.0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (loc + 3.0 * rng.standard_normal(shape)).astype(BF16)
    dy = rng.standard_normal(shape).astype(BF16)
    return x, dy, rng.uniform(0.5, 2.0, c), rng.standard_normal(c)


def _layouts():
    """(name, host x, GPU x, host dy, GPU dy, axis): rows and planes, views and copies."""
    x, dy, _, _ = _inputs((3, 4, 2, 3), -1, seed=1)
    big, big_dy, _, _ = _inputs((6, 4, 4, 6), -1, seed=2)
    nchw, nchw_dy = (np.ascontiguousarray(a.transpose(0, 3, 1, 2)) for a in (x, dy))
    bx, bdy = bdev(big), bdev(big_dy)
    return [
        ("C-nhwc", x, bdev(x), dy, bdev(dy), -1),
        ("F-nhwc", x, bdev(np.asfortranarray(x)), dy, bdev(dy), -1),
        ("C-nchw", nchw, bdev(nchw), nchw_dy, bdev(nchw_dy), 1),
        ("dense-axis0", x[:, :, 0, 0].T.copy(), bdev(x[:, :, 0, 0].T.copy()),
         dy[:, :, 0, 0].T.copy(), bdev(dy[:, :, 0, 0].T.copy()), 0),
        ("transposed", x.transpose(0, 3, 1, 2),
         transposed(dev(x.view(np.int16)), (0, 3, 1, 2)).view(BF16),
         dy.transpose(0, 3, 1, 2), bdev(np.asfortranarray(dy.transpose(0, 3, 1, 2))), 1),
        ("strided", big[::2, :, ::2, :3], bx[::2, :, ::2, :3],
         big_dy[::2, :, ::2, :3], bdy[::2, :, ::2, :3], -1),
        ("unmergeable", big[:3, :, ::2, :3], bx[:3, :, ::2, :3],
         big_dy[:3, :, ::2, :3], bdy[:3, :, ::2, :3], -1),
    ]


LAYOUT_IDS = [z[0] for z in _layouts()]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("which", range(len(LAYOUT_IDS)), ids=LAYOUT_IDS)
def test_outputs_are_the_float64_results_rounded_once(which, affine):
    name, x, xd, dy, dyd, axis = _layouts()[which]
    ax = axis % x.ndim
    c = x.shape[ax]
    rng = np.random.default_rng(3)
    gamma, beta = (rng.uniform(0.5, 2.0, c), rng.standard_normal(c)) if affine else (None, None)
    g, b = (np.ones(c), np.zeros(c)) if gamma is None else (gamma, beta)

    y, stats = nbn.batch_norm_train(xd, gamma, beta, axis=axis)
    assert _device.is_device_array(y) and y.dtype == BF16 and y.shape == x.shape
    _, mean, var = ref.train(x, gamma, beta, axis, EPS)
    stats_h = nbn.BatchStats(*(host(s) for s in stats))
    np.testing.assert_allclose(stats_h.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats_h.var, var, rtol=1e-11, atol=1e-12)
    assert_rounded(host(y), exact_train(x, g, b, ax, stats_h), f"{name}: train")

    mm, mv = 0.1 * g, 0.5 + g
    yi = host(nbn.batch_norm_inference(xd, gamma, beta, mm, mv, axis=axis))
    want = exact_inference(x, g, b, mm, mv, ax)
    assert_rounded(yi, want, f"{name}: inference")
    # the same float64 values as the CPU kernels: their bits, and ml_dtypes' rounding
    cpu = nbn.batch_norm_inference(x, gamma, beta, mm, mv, axis=axis)
    np.testing.assert_array_equal(bits(yi), bits(cpu), err_msg=name)
    np.testing.assert_array_equal(bits(yi), bits(want.astype(BF16)), err_msg=name)

    dx, dgamma, dbeta = nbn.batch_norm_backward(dyd, xd, gamma, stats, axis=axis)
    assert dx.dtype == BF16 and dx.shape == x.shape
    _, dgamma_ref, dbeta_ref = ref.backward(dy, x, gamma, axis, EPS)
    dgamma, dbeta = host(dgamma), host(dbeta)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-9, atol=1e-9)
    assert_rounded(host(dx), exact_backward(dy, x, g, ax, stats_h, dgamma, dbeta),
                   f"{name}: backward")
    np.testing.assert_array_equal(bits(host(xd)), bits(x))  # inputs left alone
    np.testing.assert_array_equal(bits(host(dyd)), bits(dy))


def _tie_values():
    """Positive float64 values whose correct bfloat16 rounding is delicate: exact ties
    between neighbours (to even), values a float64 ulp either side of a tie (rounded
    through float32 first, ``tie + ulp`` lands on the tie and rounds to even: wrong half
    the time), subnormal results (below 2**-126) and their ties, the largest finite
    value, the tie beyond it (overflows to inf) and just below that tie (does not)."""
    with np.errstate(invalid="ignore"):  # NaN patterns
        h = every_pattern(BF16).astype(np.float64)
    h = np.unique(h[np.isfinite(h) & (h > 0)])
    pick = np.r_[0:6, 120:132, 16250:16262, len(h) - 4:len(h) - 1]  # subnormals, 1.0, top
    lo, hi = h[pick], h[pick + 1]
    tie = (lo + hi) / 2
    vmax = FORMATS["bfloat16"][2]
    top = vmax + (vmax - h[-2]) / 2
    return np.concatenate([tie, np.nextafter(tie, np.inf), np.nextafter(tie, 0), h[:8] / 3,
                           [vmax, top, np.nextafter(top, 0), 1e300]])


def test_ties_subnormals_overflow_round_once():
    """Inference of x == 0 with moving mean 0 gives ``0 * scale + beta = beta`` exactly:
    the outputs are ``beta`` rounded once, whatever ``beta`` is."""
    beta = _tie_values()
    beta = np.concatenate([beta, -beta])
    c = beta.size
    x = np.zeros((2, c), BF16)
    y = host(nbn.batch_norm_inference(bdev(x), None, beta, np.zeros(c), np.ones(c)))
    want = np.broadcast_to(beta, y.shape)
    assert_rounded(y, want, "ties")
    with np.errstate(over="ignore"):
        ml = want.astype(BF16)  # ml_dtypes' rounding
        twice = want.astype(np.float32).astype(BF16)  # through float32: rounded twice
    np.testing.assert_array_equal(bits(y), bits(ml))
    assert (bits(twice) != bits(y)).any()  # the values catch a double rounding
    cpu = nbn.batch_norm_inference(x, None, beta, np.zeros(c), np.ones(c))
    np.testing.assert_array_equal(bits(y), bits(cpu))
    assert np.isinf(y[:, c // 2 - 1].astype(np.float32)).all()  # 1e300: inf, + and -
    assert np.isinf(y[:, c - 1].astype(np.float32)).all()


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_every_bit_pattern_through_a_unit_scale():
    """Inference with mean 0, variance + eps == 1 and no offset outputs ``x`` itself (and
    +0 for -0): every bfloat16 bit pattern, subnormals, infinities and NaN payloads, is
    widened exactly and narrowed back to itself; NaNs stay NaN."""
    c = 4
    x = every_pattern(BF16).reshape(-1, c)
    y = host(nbn.batch_norm_inference(bdev(x), None, None, np.zeros(c), np.full(c, 0.75),
                                      eps=0.25))
    assert_rounded(y, exact_inference(x, np.ones(c), np.zeros(c), np.zeros(c),
                                      np.full(c, 0.75), 1, eps=0.25), "every pattern")
    nan = np.isnan(x.astype(np.float32))
    same = ~nan & (bits(x) != 0x8000)
    np.testing.assert_array_equal(bits(y)[same], bits(x)[same])
    assert np.isnan(y[nan].astype(np.float32)).all()


@pytest.mark.parametrize("shape,axis", [((24, 3), -1), ((3, 3, 8), 1)])
def test_constant_channel_is_exactly_beta_and_nan_stays_in_its_channel(shape, axis):
    x, dy, gamma, beta = _inputs(shape, axis, seed=5, loc=100.0)
    beta = beta.astype(BF16).astype(np.float64)  # representable: "exactly beta"
    xm = np.moveaxis(x, axis, -1)  # a view
    xm[..., 0] = 1e4
    xm[1, ..., 1] = np.nan
    y, stats = nbn.batch_norm_train(bdev(x), gamma, beta, axis=axis)
    ym = np.moveaxis(host(y), axis, -1)
    np.testing.assert_array_equal(bits(ym[..., 0]), bits(np.full(ym[..., 0].shape, beta[0],
                                                                 BF16)))
    assert np.isnan(ym[..., 1].astype(np.float32)).all()
    assert np.isfinite(ym[..., 2:].astype(np.float32)).all()
    assert host(stats.var)[0] == 0 and np.isnan(host(stats.mean)[1])
    dx, dgamma, _ = nbn.batch_norm_backward(bdev(dy), bdev(x), gamma, stats, axis=axis)
    dxm = np.moveaxis(host(dx), axis, -1)
    assert np.isnan(dxm[..., 1].astype(np.float32)).all()
    assert np.isfinite(dxm[..., 2:].astype(np.float32)).all()
    assert np.isfinite(host(dgamma)[2:]).all()


def test_out_in_place_and_bfloat16_vectors():
    """``out`` (x itself too, dy for dx), bfloat16 GPU gamma/beta (widened on the GPU)
    and bfloat16 moving statistics updated in place (one rounding)."""
    x, dy, gamma, beta = _inputs((5, 3, 4), 1, seed=6)
    xd = bdev(x)
    y, stats = nbn.batch_norm_train(xd, gamma, beta, axis=1)
    out = bdev(np.zeros_like(x))
    assert nbn.batch_norm_train(xd, gamma, beta, axis=1, out=out)[0] is out
    np.testing.assert_array_equal(bits(host(out)), bits(host(y)))
    x2 = bdev(x)
    assert nbn.batch_norm_train(x2, gamma, beta, axis=1, out=x2)[0] is x2
    np.testing.assert_array_equal(bits(host(x2)), bits(host(y)))
    dx = nbn.batch_norm_backward(bdev(dy), xd, gamma, stats, axis=1)[0]
    dyd = bdev(dy)
    assert nbn.batch_norm_backward(dyd, xd, gamma, stats, axis=1, out=dyd)[0] is dyd
    np.testing.assert_array_equal(bits(host(dyd)), bits(host(dx)))

    g16, b16 = gamma.astype(BF16), beta.astype(BF16)
    y_vec, _ = nbn.batch_norm_train(xd, bdev(g16), bdev(b16), axis=1)
    y_host, _ = nbn.batch_norm_train(xd, g16.astype(np.float64), b16.astype(np.float64),
                                     axis=1)
    np.testing.assert_array_equal(bits(host(y_vec)), bits(host(y_host)))

    mm, mv = np.linspace(-1, 1, 3).astype(BF16), np.linspace(0.5, 2, 3).astype(BF16)
    mmd, mvd = bdev(mm), bdev(mv)
    got_mm, got_mv = nbn.update_moving_stats(mmd, mvd, stats, momentum=0.9)
    assert got_mm is mmd and got_mv is mvd
    for got, old, new in ((mmd, mm, stats.mean), (mvd, mv, stats.var)):
        want = old.astype(np.float64) * 0.9 + host(new) * (1.0 - 0.9)
        np.testing.assert_array_equal(bits(host(got)), bits(round_to(want, BF16)))


def test_dtype_errors_name_bfloat16():
    xd = bdev(np.ones((4, 3), BF16))
    with pytest.raises(TypeError, match="out must have dtype bfloat16; got float16"):
        nbn.batch_norm_train(xd, out=dev(np.ones((4, 3), np.float16)))
    with pytest.raises(TypeError, match="dy must have the dtype of x \\(bfloat16\\)"):
        nbn.batch_norm_backward(dev(np.ones((4, 3), np.float32)), xd, None,
                                nbn.batch_norm_train(xd)[1])
    with pytest.raises(TypeError, match="float32 or float64\\); got dtype int16"):
        nbn.batch_norm_train(dev(np.ones((4, 3), np.int16)))


def test_torch_bridge_hands_bfloat16_tensors_to_the_kernels(monkeypatch):
    """numbabn.torch's path for a CUDA bfloat16 tensor, run on CPU tensors standing in
    for CUDA ones (the simulator's device arrays wrap their memory): the tensor goes in
    as its int16 view made a bfloat16 device array, the kernels get int16 bits, and the
    outputs are written into PyTorch's own tensors, the float64 results rounded once.
    (tests/test_torch_cuda.py runs the real thing on a GPU.)"""
    torch = pytest.importorskip("torch")
    from numba import cuda
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    from numbabn import _cuda
    from numbabn.torch import _bridge

    class _NoStream:
        def __init__(self, x):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(_bridge, "_is_cuda", lambda t: True)
    monkeypatch.setattr(_bridge, "_scope", _NoStream)
    monkeypatch.setattr(cuda, "as_cuda_array", lambda t, sync=True: FakeCUDAArray(t.numpy()),
                        raising=False)
    monkeypatch.setattr(_bridge, "_tensor", lambda a, like: torch.from_numpy(host(a)))
    kernel_dtypes = set()
    real_prepare = _cuda._prepare
    monkeypatch.setattr(_cuda, "_prepare", lambda x, axis: (kernel_dtypes.add(str(x.dtype)),
                                                            real_prepare(x, axis))[1])

    x, dy, gamma, beta = _inputs((4, 3, 2, 5), 1, seed=8)
    xt = torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    dyt = torch.from_numpy(dy.view(np.int16)).view(torch.bfloat16)
    xt = xt.to(memory_format=torch.channels_last)
    weight, bias = torch.from_numpy(gamma), torch.from_numpy(beta)
    y, mean, var, invstd = _bridge.train(xt, weight, bias, EPS)
    assert y.dtype == torch.bfloat16 and y.stride() == xt.stride()
    stats = nbn.BatchStats(mean.numpy(), var.numpy(), invstd.numpy())
    y_bits = y.contiguous().view(torch.int16).numpy().view(BF16)
    assert_rounded(y_bits, exact_train(x, gamma, beta, 1, stats), "torch train")
    dx, dgamma, dbeta = _bridge.backward(dyt, xt, weight, mean, invstd, True)
    assert dx.dtype == torch.bfloat16
    dx_bits = dx.contiguous().view(torch.int16).numpy().view(BF16)
    assert_rounded(dx_bits, exact_backward(dy, x, gamma, 1, stats, dgamma.numpy(),
                                           dbeta.numpy()), "torch backward")
    assert kernel_dtypes == {"int16"}
