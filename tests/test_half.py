"""numbabn._half: the parallel float16 <-> float32 conversions match NumPy's casts bitwise
(NaNs: as NaNs), on both paths: the CPU's conversion instructions where it has them
(``HARDWARE``) and the portable table/bit code, which every machine tests."""

import numpy as np
import pytest

from numbabn import _half

PATHS = [False] + ([True] if _half.HARDWARE else [])


def bits(a):
    return a.view(np.uint16 if a.dtype == np.float16 else np.uint32)


def widen(h, hardware):
    out = np.empty(h.size, np.float32)
    _half.widen(h.view(np.uint16), out, hardware)
    return out


def narrow(f, hardware):
    out = np.empty(f.size, np.uint16)
    _half.narrow(f, out, hardware)
    return out.view(np.float16)


def assert_same(got, want):
    """Bitwise equal, except that a NaN only has to be a NaN."""
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    np.testing.assert_array_equal(bits(got)[~nan], bits(want)[~nan])


@pytest.mark.parametrize("hardware", PATHS)
def test_widening_matches_numpy_on_every_float16(hardware):
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    assert_same(widen(h, hardware), h.astype(np.float32))


@pytest.mark.parametrize("hardware", PATHS)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_narrowing_matches_numpy_on_random_bit_patterns(hardware):
    rng = np.random.default_rng(7)
    f = rng.integers(0, 1 << 32, 1 << 22, dtype=np.uint64).astype(np.uint32).view(np.float32)
    assert_same(narrow(f, hardware), f.astype(np.float16))


@pytest.mark.parametrize("hardware", PATHS)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_narrowing_rounds_ties_to_even_and_underflows_like_numpy(hardware):
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    halves = halves[np.isfinite(halves)].astype(np.float64)
    halves.sort()
    mid = ((halves[:-1] + halves[1:]) / 2).astype(np.float32)  # exact ties, float16 < 2^16
    f = np.concatenate([
        mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(-np.inf)),
        halves.astype(np.float32),
        np.float32([65504, 65519.996, 65520, 1e30, -1e30, 2.0 ** -24, 2.0 ** -25,
                    2.0 ** -25 * 1.0000001, 2.0 ** -26, 1e-30, -0.0, 0.0]),
        np.random.default_rng(1).uniform(-1e-4, 1e-4, 1 << 16).astype(np.float32),
    ])
    np.testing.assert_array_equal(bits(narrow(f, hardware)), bits(f.astype(np.float16)))


@pytest.mark.parametrize("hardware", PATHS)
def test_specials_keep_their_class(hardware):
    f = np.float32([np.inf, -np.inf, np.nan, -np.nan, 7e4, -7e4])
    got = narrow(f, hardware)
    assert np.isposinf(got[[0, 4]]).all() and np.isneginf(got[[1, 5]]).all()
    assert np.isnan(got[2:4]).all()


@pytest.mark.parametrize("make", [
    lambda a: a,                               # C-contiguous
    lambda a: np.asfortranarray(a),            # Fortran-contiguous
    lambda a: a.transpose(2, 0, 1),            # contiguous in another axis order
    lambda a: a[:, ::2],                       # strided: NumPy's cast
    lambda a: a[:0],                           # empty
], ids=["C", "F", "transposed", "strided", "empty"])
def test_layouts_round_trip(make):
    x = make(np.random.default_rng(2).standard_normal((6, 10, 4)).astype(np.float16))
    wide = _half.to_float32(x)
    np.testing.assert_array_equal(wide, x.astype(np.float32))
    back = _half.to_float16(wide)
    assert back.shape == x.shape
    np.testing.assert_array_equal(bits(back), bits(x))


@pytest.mark.parametrize("out_order", ["C", "F"])
def test_out_in_either_order(out_order):
    y = np.random.default_rng(3).standard_normal((5, 7)).astype(np.float32)
    out = np.empty((5, 7), np.float16, order=out_order)
    assert _half.to_float16(y, out) is out
    np.testing.assert_array_equal(bits(out), bits(y.astype(np.float16)))
