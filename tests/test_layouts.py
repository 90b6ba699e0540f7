"""The input zoo: memory orders, strided views, odd channel counts, out= and in-place."""

import numpy as np
import pytest

import numbabn as nbn
import reference as ref
from exact import EPS, exact_backward, exact_inference, exact_train
from helpers import assert_close


def _zoo(channels, dtype):
    """(name, x, axis) views of fresh random data in many memory layouts."""
    rng = np.random.default_rng(channels)
    base = (rng.standard_normal((6, 5, 4, channels)) * 2 + 1).astype(dtype)
    big = (rng.standard_normal((12, 5, 8, 2 * channels)) * 2 + 1).astype(dtype)
    nchw = np.ascontiguousarray(base.transpose(0, 3, 1, 2))
    return [
        ("C-nhwc", base, -1),
        ("F-nhwc", np.asfortranarray(base), -1),
        ("C-nchw", nchw, 1),
        ("F-nchw", np.asfortranarray(nchw), 1),
        ("transposed", base.transpose(0, 3, 1, 2), 1),
        ("2d-F", np.asfortranarray(base.reshape(-1, channels)), -1),
        ("2d-T", np.ascontiguousarray(base.reshape(-1, channels).T).T, -1),
        ("strided-batch", big[::2, :, ::2, :channels], -1),
        ("strided-channels", big[:6, :, :4, ::2], -1),
        ("negative-strides", base[::-1, :, ::-1], -1),
        ("broadcast", np.broadcast_to(base[:1], base.shape), -1),
        ("axis-in-middle", base.transpose(1, 3, 0, 2), 1),
    ]


ZOO_IDS = [z[0] for z in _zoo(3, np.float32)]


@pytest.mark.parametrize("channels", [1, 3, 7, 129])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("which", range(len(ZOO_IDS)), ids=ZOO_IDS)
def test_zoo_matches_reference_and_leaves_inputs_alone(channels, dtype, which):
    name, x, axis = _zoo(channels, dtype)[which]
    rng = np.random.default_rng(7)
    dy = np.asarray(rng.standard_normal(x.shape).astype(dtype), order="F")
    gamma, beta = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
    x_before, dy_before = x.copy(), dy.copy()
    g_before, b_before = gamma.copy(), beta.copy()

    y, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis)
    y_inf = nbn.batch_norm_inference(x, gamma, beta, stats.mean, stats.var, axis=axis)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis=axis)

    y_ref, _, _ = ref.train(x, gamma, beta, axis, 1e-3)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy, x, gamma, axis, 1e-3)
    assert_close(y, y_ref, dtype, err_msg=name)
    assert_close(y_inf, y_ref, dtype, err_msg=name)
    assert_close(dx, dx_ref, dtype, err_msg=name)
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(dbeta, dbeta_ref, rtol=1e-9, atol=1e-9)
    for before, after in [(x_before, x), (dy_before, dy), (g_before, gamma), (b_before, beta)]:
        assert np.array_equal(before, after)
    assert y.shape == x.shape and dx.dtype == x.dtype


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("out_order", ["C", "F", "strided"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_out_arrays_of_any_layout(dtype, out_order, axis):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 6, 7, 8)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)

    def make_out():
        if out_order == "strided":
            return np.empty((10,) + x.shape[1:], dtype)[::2]
        return np.empty(x.shape, dtype, order=out_order)

    expected_y, stats = nbn.batch_norm_train(x, axis=axis)
    out = make_out()
    y, _ = nbn.batch_norm_train(x, axis=axis, out=out)
    assert y is out and np.array_equal(out, expected_y)

    out = make_out()
    assert nbn.batch_norm_inference(x, None, None, stats.mean, stats.var, axis=axis, out=out) is out
    assert np.array_equal(out, expected_y)

    expected_dx = nbn.batch_norm_backward(dy, x, None, stats, axis=axis)[0]
    out = make_out()
    assert nbn.batch_norm_backward(dy, x, None, stats, axis=axis, out=out)[0] is out
    assert np.array_equal(out, expected_dx)


@pytest.mark.parametrize("axis", [-1, 1])
def test_in_place(axis):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((4, 5, 6, 7)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    expected_y, stats = nbn.batch_norm_train(x, axis=axis)
    expected_dx = nbn.batch_norm_backward(dy, x, None, stats, axis=axis)[0]
    dx = nbn.batch_norm_backward(dy, x, None, stats, axis=axis, out=dy)[0]
    assert dx is dy and np.array_equal(dx, expected_dx)
    y, _ = nbn.batch_norm_train(x, axis=axis, out=x)
    assert y is x and np.array_equal(x, expected_y)


def test_lists_are_accepted_as_input():
    y, stats = nbn.batch_norm_train([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_allclose(stats.mean, [2.0, 3.5])
    assert y.dtype == np.float64


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("shape, axis", [((64, 40, 40, 8), -1), ((16, 8, 40, 40), 1),
                                         ((4, 3, 5, 7), 1)])
def test_in_place_gives_the_bits_of_a_separate_output(shape, axis, dtype, monkeypatch):
    """``out=x`` (and ``out=dy``) run the kernels compiled for one buffer
    (``_cpu._in_place``), parallel ones included (the first two shapes are over
    ``config.SERIAL_BELOW``): the same bits as into a separate array."""
    from numbabn import _cpu

    one_buffer = []

    def spy(view, out, first, first_view):
        got = in_place(view, out, first, first_view)
        one_buffer.append(got is None)
        return got

    in_place = _cpu._in_place
    monkeypatch.setattr(_cpu, "_in_place", spy)
    rng = np.random.default_rng(12)
    x = (rng.standard_normal(shape) * 3 + 40).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    y, stats = nbn.batch_norm_train(x, g, b, axis=axis)
    yi = nbn.batch_norm_inference(x, g, b, stats.mean, stats.var, axis=axis)
    dx = nbn.batch_norm_backward(dy, x, g, stats, axis=axis)[0]
    x1, x2, dy1 = x.copy(), x.copy(), dy.copy()
    y1, stats1 = nbn.batch_norm_train(x1, g, b, axis=axis, out=x1)
    yi1 = nbn.batch_norm_inference(x2, g, b, stats.mean, stats.var, axis=axis, out=x2)
    dx1 = nbn.batch_norm_backward(dy1, x, g, stats, axis=axis, out=dy1)[0]
    assert y1 is x1 and yi1 is x2 and dx1 is dy1
    # the three calls without out= and the three with it, in that order
    assert one_buffer == [False] * 3 + [dtype != np.float16] * 3  # float16: bit views
    for got, want in ((y1, y), (yi1, yi), (dx1, dx), (stats1.var, stats.var)):
        assert got.tobytes() == want.tobytes()


# Rows layouts with few channels (config.FOLD_ROWS_BELOW) are folded: g rows side by side
# in one row of the kernels' view, with the per-channel vectors tiled; wider rows, and
# rows that are not one run in memory, are not. Both must give every output as the
# float64 value rounded once.
FEW_CHANNELS = [1, 3, 6, 16, 63, 64, 65]
ROW_VIEWS = {
    "C": lambda a: a,
    # NHWC memory seen as NCHW with axis 1 (a torch channels_last tensor's NumPy view;
    # the test moves the axis): the kernels get a strided (R, C) view of one run
    "channels-last": lambda a: a,
    "strided rows": lambda a: np.concatenate([a, a], axis=0)[::2],
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("view", ROW_VIEWS)
@pytest.mark.parametrize("channels", FEW_CHANNELS)
def test_rows_of_few_channels_are_the_float64_values_rounded_once(channels, view, dtype):
    rng = np.random.default_rng(channels)
    shape = (5, 7, 9, channels)  # 315 rows: blocks of whole rows and a shorter last one
    x = ROW_VIEWS[view]((2.0 + 3.0 * rng.standard_normal(shape)).astype(dtype))
    dy = ROW_VIEWS[view](rng.standard_normal(shape).astype(dtype))
    gamma, beta = rng.uniform(0.5, 2.0, channels), rng.standard_normal(channels)
    if view == "channels-last":
        x, dy = np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1)  # NCHW shape, NHWC memory
    axis = 1 if view == "channels-last" else -1
    ax = axis % x.ndim
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis, eps=EPS)
    np.testing.assert_array_equal(y, exact_train(x, gamma, beta, ax, stats).astype(dtype))
    mm, mv = 0.1 * beta, 0.5 + gamma
    yi = nbn.batch_norm_inference(x, gamma, beta, mm, mv, axis, eps=EPS)
    np.testing.assert_array_equal(yi, exact_inference(x, gamma, beta, mm, mv, ax).astype(dtype))
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis)
    want_dx = exact_backward(dy, x, gamma, ax, stats, dgamma, dbeta).astype(dtype)
    np.testing.assert_array_equal(dx, want_dx)
    # in place, and an upstream gradient broadcast from one value (stride 0)
    x2 = x.copy()
    nbn.batch_norm_inference(x2, gamma, beta, mm, mv, axis, eps=EPS, out=x2)
    np.testing.assert_array_equal(x2, yi)
    dy2 = dy.copy()
    nbn.batch_norm_backward(dy2, x, gamma, stats, axis, out=dy2)
    np.testing.assert_array_equal(dy2, want_dx)
    ones = np.broadcast_to(np.ones((), dtype), x.shape)
    dx1, dgamma1, dbeta1 = nbn.batch_norm_backward(ones, x, gamma, stats, axis)
    np.testing.assert_array_equal(
        dx1, exact_backward(np.ones(x.shape, dtype), x, gamma, ax, stats, dgamma1,
                            dbeta1).astype(dtype))


def test_fold_rows_is_the_smallest_divisor_that_reaches_the_width():
    from numbabn._kernels_cpu import fold_rows
    from numbabn.config import FOLD_ROW_WIDTH, FOLD_ROWS_BELOW
    assert FOLD_ROW_WIDTH == 128 and FOLD_ROWS_BELOW == 64  # the cases below assume them
    assert fold_rows(100352, 6) == 28            # 2**11 * 7**2: 22..27 do not divide it
    assert fold_rows(32768, 16) == 8
    assert fold_rows(315, 1) == 315               # 128..315: only 315 divides
    assert fold_rows(6, 5) == 1                   # fewer rows than a folded row needs
    assert fold_rows(2 * 1031, 6) == 1            # 1031 is prime and past 8 x 22 rows
    assert fold_rows(1 << 20, 63) == 4 and fold_rows(1 << 20, 64) == 1
    for outer in (1, 2, 12, 120, 1000, 4096, 100352):
        for channels in (1, 3, 6, 16, 24, 32, 48, 63):
            g = fold_rows(outer, channels)
            assert g == 1 or (outer % g == 0 and g * channels >= FOLD_ROW_WIDTH and not any(
                outer % h == 0 and h * channels >= FOLD_ROW_WIDTH for h in range(2, g)))


@pytest.mark.parametrize("shape,axis,folded", [
    ((128, 28, 28, 6), -1, (3584, 168)),          # NHWC: rows folded by 28
    ((128, 10), 1, (8, 160)),                      # a narrow dense layer
    ((128, 6, 28, 28), 1, (128, 6, 784)),          # NCHW: planes, not rows
    ((4096, 64), 1, (4096, 64)),                   # wide enough
])
def test_the_kernels_see_narrow_rows_folded(shape, axis, folded):
    from numbabn import _layout
    x = np.zeros(shape, np.float32)
    layout, view = _layout.prepare(x, axis % x.ndim)
    assert view.shape == folded and np.shares_memory(view, x)
    assert layout.channels == shape[axis] and layout.count * layout.channels == x.size
    # rows whose memory is not one run are not folded (the first channels of wider rows)
    if len(folded) == 2 and folded[1] != shape[axis]:
        part = np.zeros(shape[:-1] + (2 * shape[-1],), np.float32)[..., :shape[-1]]
        layout, view = _layout.prepare(part, axis % x.ndim)
        assert view.shape == (layout.count, shape[axis]) and np.shares_memory(view, part)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_folded_rows_into_an_out_of_other_strides(dtype):
    """A folded x with an ``out=`` whose rows are not one run: through a temporary."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 8, 8, 6)).astype(dtype)
    gamma, beta = rng.uniform(0.5, 2.0, 6), rng.standard_normal(6)
    y, stats = nbn.batch_norm_train(x, gamma, beta, eps=EPS)
    out = np.full((8, 8, 8, 6), np.nan, dtype)[::2]
    y2, stats2 = nbn.batch_norm_train(x, gamma, beta, eps=EPS, out=out)
    assert y2 is out
    np.testing.assert_array_equal(out, y)
    np.testing.assert_array_equal(stats2.var, stats.var)
    dy = rng.standard_normal(x.shape).astype(dtype)
    out = np.full((8, 8, 8, 6), np.nan, dtype)[::2]
    nbn.batch_norm_backward(dy, x, gamma, stats, out=out)
    np.testing.assert_array_equal(out, nbn.batch_norm_backward(dy, x, gamma, stats)[0])
