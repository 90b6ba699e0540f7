"""Half-precision storage: float16 and bfloat16 (ml_dtypes) read and written by the kernels.

What "exact" means here. The kernels compute every output in float64 from float64
per-channel coefficients (mean, invstd * gamma, ...), then round it once to the storage
format. The float64 value is not the real-number result (it carries a few float64 ulps
of error), so the output cannot be promised to be the correctly rounded *real* result:
within ~1e-16 relative of a half-way point it may be the other neighbour. What is
promised, and tested bit for bit, is that each output is the correctly rounded (to
nearest, ties to even) value of the float64 result, which NumPy recomputes here with the
same IEEE operations in the same order from the statistics the kernel returned
(``exact_*``). The statistics themselves are checked against the float64 reference of
the half inputs (``reference.py``).

The rounding is checked against `round_to` (tests/halves.py, with the ``exact_*``
recomputations), an exact rounding written with ``frexp`` and ``rint`` (no conversion
routine involved), and the conversions against NumPy's float16 casts and ml_dtypes'
bfloat16 casts.
"""

import numpy as np
import pytest
from numba import njit

import numbabn as nbn
from numbabn import _half
import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")

from halves import (BF16, EPS, F16, FORMATS, HALVES, assert_rounded, bits,  # noqa: E402
                    every_pattern, exact_backward, exact_inference, exact_train, round_to)

# ------------------------------------------------------------------ the conversions

@njit
def _apply(f, a, out):
    for i in range(a.size):
        out[i] = f(a[i])


def widen(bits16, dtype, hardware=_half.HARDWARE):
    f = {("float16", True): _half.half_to_f64_hw, ("float16", False): _half.half_to_f64_sw,
         ("bfloat16", True): _half.bf16_to_f64, ("bfloat16", False): _half.bf16_to_f64}
    out = np.empty(bits16.size)
    _apply(f[np.dtype(dtype).name, hardware], bits16.view(_half._VIEW[np.dtype(dtype).name]),
           out)
    return out


def narrow(v, dtype, hardware=_half.HARDWARE):
    name = np.dtype(dtype).name
    f = {("float16", True): _half.f64_to_half_hw, ("float16", False): _half.f64_to_half_sw,
         ("bfloat16", True): _half.f64_to_bf16, ("bfloat16", False): _half.f64_to_bf16}
    out = np.empty(v.size, _half._VIEW[name])
    _apply(f[name, hardware], np.ascontiguousarray(v, np.float64), out)
    return out.view(dtype)


PATHS = [(F16, False), (BF16, False)] + ([(F16, True)] if _half.HARDWARE else [])
PATH_IDS = [f"{d.name}-{'hw' if hw else 'portable'}" for d, hw in PATHS]


@pytest.mark.parametrize("dtype, hardware", PATHS, ids=PATH_IDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_widening_every_bit_pattern(dtype, hardware):
    h = every_pattern(dtype)
    got, want = widen(h.view(np.uint16), dtype, hardware), h.astype(np.float64)
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint64), want[~nan].view(np.uint64))


@np.errstate(invalid="ignore")
def _narrowing_inputs(dtype):
    """Every finite value, the midpoints between neighbours (exact ties), the float64
    values next to them (where rounding through float32 first would go wrong), and
    values beyond the range, tiny ones and random float64 bit patterns."""
    h = every_pattern(dtype).astype(np.float64)
    h = np.unique(h[np.isfinite(h)])
    mid = (h[:-1] + h[1:]) / 2  # exact in float64
    _, _, vmax = FORMATS[dtype.name]
    top = np.float64(vmax) + (np.float64(vmax) - h[-2]) / 2  # half-way to the next binade
    edges = np.array([top, -top, np.nextafter(top, 0), np.nextafter(top, np.inf), 1e300,
                      -1e300, 1e-300, -1e-300, 5e-324, 0.0, -0.0, np.inf, -np.inf])
    rng = np.random.default_rng(1)
    rand = rng.integers(0, 1 << 63, 1 << 18, dtype=np.uint64).view(np.float64)
    rand = np.concatenate([rand, -rand, rng.standard_normal(1 << 16) * 1e3])
    return np.concatenate([h, mid, np.nextafter(mid, np.inf), np.nextafter(mid, -np.inf),
                           edges, rand])


@pytest.mark.parametrize("dtype, hardware", PATHS, ids=PATH_IDS)
def test_narrowing_rounds_once_to_nearest_even(dtype, hardware):
    v = _narrowing_inputs(dtype)
    v = v[np.isfinite(v) | np.isinf(v)]
    got = narrow(v, dtype, hardware)
    np.testing.assert_array_equal(bits(got), bits(round_to(v, dtype)))
    if dtype == F16:  # NumPy's float64 -> float16 cast is a direct, correct rounding
        with np.errstate(over="ignore"):
            np.testing.assert_array_equal(bits(got), bits(v.astype(np.float16)))


@pytest.mark.parametrize("dtype, hardware", PATHS, ids=PATH_IDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_narrowing_float32_values_matches_numpy_and_ml_dtypes(dtype, hardware):
    """float32 values (exact in float64) round like the libraries' own casts."""
    rng = np.random.default_rng(7)
    f = rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32)
    f = np.concatenate([f, every_pattern(dtype).astype(np.float32)])
    got, want = narrow(f.astype(np.float64), dtype, hardware), f.astype(dtype)
    nan = np.isnan(f)
    np.testing.assert_array_equal(bits(got)[~nan], bits(want)[~nan])
    assert np.isnan(got[nan].astype(np.float32)).all()


@pytest.mark.parametrize("dtype, hardware", PATHS, ids=PATH_IDS)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_nan_payloads_stay_nan_and_quiet(dtype, hardware):
    h = every_pattern(dtype)
    nan_bits = h.view(np.uint16)[np.isnan(h.astype(np.float32))]
    back = narrow(widen(nan_bits, dtype, hardware), dtype, hardware)
    assert np.isnan(back.astype(np.float32)).all()
    quiet = 0x0200 if dtype == F16 else 0x0040
    assert (bits(back) & quiet).all()
    np.testing.assert_array_equal(bits(back) & 0x8000, nan_bits & 0x8000)  # sign kept


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: d.name)
@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")
def test_element_access_from_python_is_the_compiled_conversion(dtype):
    """`_half.widen` and `_half.narrow` called from Python (as the CUDA simulator runs the
    kernels) on NumPy scalars of the storage views: the compiled conversions' results."""
    view = _half._VIEW[dtype.name]
    pattern = every_pattern(dtype).view(view)[::7]
    got = np.array([_half.widen(b) for b in pattern])
    want = widen(pattern.view(np.uint16), dtype)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    v = _narrowing_inputs(dtype)[::97]
    v = v[~np.isnan(v)]
    got = np.array([_half.narrow(d, view) for d in v], view)
    np.testing.assert_array_equal(got.view(np.uint16), bits(narrow(v, dtype)))
    assert _half.narrow(np.float64(0.1), np.dtype(np.float32)) == np.float32(0.1)


@njit
def _blocks(t, y, size):
    for i0 in range(0, t.size, size):
        _half.narrow_block(t[i0:i0 + size], y[i0:i0 + size])


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: d.name)
@pytest.mark.parametrize("size", [1, 7, 256])
def test_narrow_block_is_narrow(dtype, size):
    """The kernels' block writer (bfloat16: a rounding without selects, the block written
    again with `narrow` when its result has a zero, subnormal, infinity or NaN): the same
    bits as `narrow` element by element, every NaN bit pattern's class included."""
    v = _narrowing_inputs(dtype)
    rng = np.random.default_rng(5)
    top = np.arange(1 << 12, dtype=np.uint64) << np.uint64(52)  # every sign and exponent
    low = np.array([0, 1, (1 << 45) - 1, 1 << 45, (1 << 51) - 1, 1 << 51, (1 << 52) - 1,
                    0x7F << 45, (0x7F << 45) + 1], np.uint64)
    specials = (top[:, None] | low[None, :]).ravel().view(np.float64)
    t = 2.0 ** -126
    near = np.array([t - 2.0 ** -134, t - 2.0 ** -135, t - 2.0 ** -136, t - 2.0 ** -133 * 1.5])
    v = np.concatenate([v, specials, near, -near])
    v = v[rng.permutation(v.size)]  # rare values spread over blocks of common ones
    got = np.empty(v.size, _half._VIEW[dtype.name])
    _blocks(v, got, size)
    np.testing.assert_array_equal(got.view(np.uint16), bits(narrow(v, dtype)))


# --------------------------------------------------------------------- the kernels

LAYOUTS = [
    ((64, 8), -1), ((7, 3), 0), ((5, 6, 7, 3), -1), ((5, 3, 6, 7), 1), ((2, 3, 129, 4), 2),
    ((3, 5, 70, 70), 1), ((4000, 3), -1), ((1, 9, 1, 3), 1),
]
ORDERS = {
    "C": lambda a: a,
    "F": np.asfortranarray,
    "strided": lambda a: np.concatenate([a, a], axis=0)[::2],
}


def _inputs(shape, axis, dtype, seed, loc=0.0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (loc + 3.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, rng.uniform(0.5, 2.0, c), rng.standard_normal(c)


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: d.name)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("shape, axis", LAYOUTS, ids=lambda v: str(v))
def test_outputs_are_the_float64_results_rounded_once(shape, axis, order, dtype):
    x, dy, gamma, beta = _inputs(shape, axis, dtype, seed=len(shape) + shape[0])
    x, dy = ORDERS[order](x), ORDERS[order](dy)
    ax = axis % x.ndim
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis)
    assert y.dtype == dtype and y.shape == x.shape and stats.mean.dtype == np.float64
    want_y, mean, var = ref.train(x, gamma, beta, axis, EPS)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.var, var, rtol=1e-11, atol=1e-12)
    assert_rounded(y, exact_train(x, gamma, beta, ax, stats), "train")
    mm, mv = 0.1 * beta, 0.5 + gamma
    yi = nbn.batch_norm_inference(x, gamma, beta, mm, mv, axis)
    assert yi.dtype == dtype
    assert_rounded(yi, exact_inference(x, gamma, beta, mm, mv, ax), "inference")
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis)
    assert dx.dtype == dtype and dgamma.dtype == np.float64
    _, want_dgamma, want_dbeta = ref.backward(dy, x, gamma, axis, EPS)
    np.testing.assert_allclose(dgamma, want_dgamma, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dbeta, want_dbeta, rtol=1e-9, atol=1e-9)
    assert_rounded(dx, exact_backward(dy, x, gamma, ax, stats, dgamma, dbeta), "backward")


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: d.name)
@pytest.mark.parametrize("out_order", ["C", "F"])
def test_out_in_place_and_in_either_order(dtype, out_order):
    x, dy, gamma, beta = _inputs((6, 5, 4, 3), 1, dtype, seed=3)
    y, stats = nbn.batch_norm_train(x, gamma, beta, 1)
    out = np.empty(x.shape, dtype, order=out_order)
    assert nbn.batch_norm_train(x, gamma, beta, 1, out=out)[0] is out
    np.testing.assert_array_equal(bits(out), bits(y))
    dx = nbn.batch_norm_backward(dy, x, gamma, stats, 1)[0]
    assert nbn.batch_norm_backward(dy, x, gamma, stats, 1, out=dy)[0] is dy
    np.testing.assert_array_equal(bits(dy), bits(dx))
    x2 = x.copy()
    assert nbn.batch_norm_train(x2, gamma, beta, 1, out=x2)[0] is x2
    np.testing.assert_array_equal(bits(x2), bits(y))


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, axis", [((64, 10, 10, 4), -1), ((16, 4, 30, 30), 1)])
def test_constant_channel_is_exactly_beta_and_nan_stays_in_its_channel(dtype, shape, axis):
    x, dy, gamma, beta = _inputs(shape, axis, dtype, seed=5, loc=100.0)
    beta = beta.astype(dtype).astype(np.float64)  # representable: "exactly beta"
    xm = np.moveaxis(x, axis, -1)  # a view
    xm[..., 0] = 1e4 if dtype == BF16 else 1000.0  # constant channel at a large value
    xm[3, ..., 1] = np.nan
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis)
    ym = np.moveaxis(y, axis, -1)
    np.testing.assert_array_equal(bits(ym[..., 0]), bits(np.full(ym[..., 0].shape, beta[0],
                                                                 dtype)))
    assert np.isnan(ym[..., 1].astype(np.float32)).all()
    assert np.isfinite(ym[..., 2:].astype(np.float32)).all()
    assert stats.var[0] == 0 and np.isnan(stats.mean[1])
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis)
    dxm = np.moveaxis(dx, axis, -1)
    assert np.isnan(dxm[..., 1].astype(np.float32)).all()
    assert np.isfinite(dxm[..., 2:].astype(np.float32)).all() and np.isfinite(dgamma[2:]).all()


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: d.name)
@pytest.mark.filterwarnings("ignore:invalid value encountered")
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_ties_subnormals_overflow_and_nan_payloads(dtype):
    """Inputs of every class, and outputs that tie, underflow and overflow: no crash,
    and still the float64 results rounded once."""
    c = 4
    every = every_pattern(dtype)
    x = np.resize(every, (every.size // c, c)).copy()  # every pattern, NaN payloads too
    x[:, 3] = every[np.isfinite(every.astype(np.float32))][:x.shape[0]]
    y, stats = nbn.batch_norm_train(x, None, None)
    assert np.isnan(stats.mean[:3]).all() and np.isnan(y[:, :3].astype(np.float32)).all()
    assert_rounded(y, exact_train(x, np.ones(c), np.zeros(c), 1, stats), "classes")
    # outputs on exact ties, in the subnormal range and beyond the largest finite value:
    # inference of x = 0 with moving mean 0 gives y = 0 * scale + beta = beta exactly
    vals = every.astype(np.float64)
    vals = np.unique(vals[np.isfinite(vals) & (vals > 0)])
    beta = np.concatenate([(vals[:-1] + vals[1:]) / 2, vals[:64] / 3,
                           [FORMATS[dtype.name][2] * 1.5]])
    beta = np.concatenate([beta, -beta])
    x = np.zeros((3, beta.size), dtype)
    y = nbn.batch_norm_inference(x, None, beta, np.zeros(beta.size), np.ones(beta.size))
    assert_rounded(y, np.broadcast_to(beta, y.shape), "ties")
    assert np.isinf(y[:, beta.size // 2 - 1].astype(np.float32)).all()


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: d.name)
def test_statistics_of_large_means_keep_float64_accuracy(dtype):
    rng = np.random.default_rng(11)
    x = (np.float64(256.0) + rng.standard_normal((20000, 3))).astype(dtype)
    y, stats = nbn.batch_norm_train(x)
    _, mean, var = ref.train(x, None, None, -1, EPS)
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(stats.var, var, rtol=1e-10)


def test_stages_take_bfloat16():
    from numbabn import stages

    x, dy, gamma, beta = _inputs((8, 5, 6, 4), -1, BF16, seed=2)
    y, stats = nbn.batch_norm_train(x, gamma, beta)
    m = stages.batch_moments(x)
    np.testing.assert_array_equal(m.mean, stats.mean)
    y2 = stages.batch_norm_apply(x, gamma, beta, m.mean, stats.invstd)
    assert y2.dtype == BF16
    np.testing.assert_array_equal(bits(y2), bits(y))
    sums = stages.batch_norm_grad_sums(dy, x, m.mean)
    dx = stages.batch_norm_grad_input(dy, x, gamma, m.mean, stats.invstd, sums, m.count)
    dx2 = nbn.batch_norm_backward(dy, x, gamma, stats)[0]
    np.testing.assert_array_equal(bits(dx), bits(dx2))


@pytest.mark.parametrize("call, err, match", [
    (lambda x: nbn.batch_norm_backward(x.astype(np.float16), x, None,
                                       nbn.batch_norm_train(x)[1]),
     TypeError, "dy must have the dtype of x \\(bfloat16\\); got float16"),
    (lambda x: nbn.batch_norm_train(x, out=np.empty(x.shape, np.float16)),
     TypeError, "out must have dtype bfloat16; got float16"),
    (lambda x: nbn.batch_norm_train(x.view(np.int16)),
     TypeError, "bfloat16 from ml_dtypes, float32 or float64\\); got dtype int16"),
])
def test_bfloat16_errors_name_the_dtypes(call, err, match):
    x = np.ones((4, 3), BF16)
    with pytest.raises(err, match=match):
        call(x)


def test_numbabn_imports_and_runs_without_ml_dtypes(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.modules['ml_dtypes'] = None\n"
            "import numpy as np, numbabn as nbn\n"
            "y, s = nbn.batch_norm_train(np.ones((4, 3), np.float16))\n"
            "assert 'ml_dtypes' not in [m for m in sys.modules if sys.modules[m]]\n"
            "print(y.dtype)")
    root = str(__import__("pathlib").Path(__file__).parents[1])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "float16"


@pytest.mark.parametrize("dtype", HALVES, ids=lambda d: d.name)
@pytest.mark.parametrize("shape, axis", [((8, 5, 5, 16), -1), ((8, 16, 5, 5), 1)])
def test_c_entry_points_take_half_bits(dtype, shape, axis):
    """The task functions are generic, so the C entry points (what numbabn's TensorFlow
    op calls) compile for the bit views too and give the NumPy API's bits, here with
    the tasks run one per call in reverse order (any split and order merges the same)
    and the outputs written over their inputs (bfloat16's staged passes too)."""
    from numbabn._half import _VIEW
    from helpers import c_entry_point_ops

    x, dy, gamma, beta = _inputs(shape, axis, dtype, seed=9)
    train, backward = c_entry_point_ops(_VIEW[dtype.name].name, shape, axis, step=-1,
                                        in_place=True)
    y, mean, var, invstd = train(x, gamma, beta, EPS)
    dx, dgamma, _ = backward(dy, x, gamma, mean, invstd)
    want_y, stats = nbn.batch_norm_train(x, gamma, beta, axis)
    want_dx, want_dgamma, _ = nbn.batch_norm_backward(dy, x, gamma, stats, axis)
    np.testing.assert_array_equal(bits(y), bits(want_y))
    np.testing.assert_array_equal(mean, stats.mean)
    np.testing.assert_array_equal(bits(dx), bits(want_dx))
    np.testing.assert_array_equal(dgamma, want_dgamma)
