"""The input zoo: memory orders, strided views, odd channel counts, out= and in-place."""

import numpy as np
import pytest

import numbabn as nbn
import reference as ref
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
