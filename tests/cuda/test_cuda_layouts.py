"""GPU inputs and outputs in many memory layouts, out= and in-place work."""

import numpy as np
import pytest

import numbabn as nbn
import reference as ref
from cuda_helpers import dev, host, transposed
from helpers import assert_close


def _zoo(channels):
    """(name, host x, GPU x, axis): the same values in many device layouts."""
    rng = np.random.default_rng(channels)
    base = (rng.standard_normal((3, 4, 2, channels)) * 2 + 1).astype(np.float32)
    big = (rng.standard_normal((6, 4, 4, 2 * channels)) * 2 + 1).astype(np.float32)
    nchw = np.ascontiguousarray(base.transpose(0, 3, 1, 2))
    big_d = dev(big)
    return [
        ("C-nhwc", base, dev(base), -1),
        ("F-nhwc", base, dev(np.asfortranarray(base)), -1),
        ("C-nchw", nchw, dev(nchw), 1),
        ("transposed", base.transpose(0, 3, 1, 2), transposed(dev(base), (0, 3, 1, 2)), 1),
        ("axis-in-middle", base.transpose(1, 3, 0, 2), transposed(dev(base), (1, 3, 0, 2)), 1),
        ("strided-batch", big[::2, :, ::2, :channels], big_d[::2, :, ::2, :channels], -1),
        ("strided-channels", big[:3, :, :2, ::2], big_d[:3, :, :2, ::2], -1),
        ("unmergeable", big[:3, :, ::2, :channels], big_d[:3, :, ::2, :channels], -1),
    ]


ZOO_IDS = [z[0] for z in _zoo(3)]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("which", range(len(ZOO_IDS)), ids=ZOO_IDS)
def test_zoo_matches_reference_and_leaves_inputs_alone(channels, which):
    name, x, xd, axis = _zoo(channels)[which]
    rng = np.random.default_rng(7)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    gamma, beta = rng.uniform(0.5, 2, channels), rng.standard_normal(channels)
    dyd = dev(np.asfortranarray(dy))  # a memory order unlike x's: viewed or copied
    y, stats = nbn.batch_norm_train(xd, gamma, beta, axis=axis)
    y_inf = nbn.batch_norm_inference(xd, gamma, beta, stats.mean, stats.var, axis=axis)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dyd, xd, gamma, stats, axis=axis)

    y_ref, _, _ = ref.train(x, gamma, beta, axis, 1e-3)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dy, x, gamma, axis, 1e-3)
    assert_close(host(y), y_ref, np.float32, err_msg=name)
    assert_close(host(y_inf), y_ref, np.float32, err_msg=name)
    assert_close(host(dx), dx_ref, np.float32, err_msg=name)
    np.testing.assert_allclose(host(dgamma), dgamma_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(host(dbeta), dbeta_ref, rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(host(xd), x)
    np.testing.assert_array_equal(host(dyd), dy)
    assert y.shape == x.shape


def test_negative_strides():
    x = np.random.default_rng(8).standard_normal((4, 3, 5)).astype(np.float32)
    y, _ = nbn.batch_norm_train(dev(x)[::-1, :, ::-1], axis=1)
    assert_close(host(y), ref.train(x[::-1, :, ::-1], None, None, 1, 1e-3)[0], np.float32)


@pytest.mark.parametrize("out_order", ["C", "F", "strided"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_out_arrays_of_any_layout(out_order, axis):
    rng = np.random.default_rng(9)
    x = rng.standard_normal((3, 4, 2, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    xd, dyd = dev(x), dev(dy)

    def make_out():
        if out_order == "strided":
            return dev(np.zeros((6,) + x.shape[1:], np.float32))[::2]
        return dev(np.zeros(x.shape, np.float32, order=out_order))

    expected_y, stats = nbn.batch_norm_train(xd, axis=axis)
    out = make_out()
    y, _ = nbn.batch_norm_train(xd, axis=axis, out=out)
    assert y is out
    np.testing.assert_array_equal(host(out), host(expected_y))

    out = make_out()
    assert nbn.batch_norm_inference(xd, None, None, stats.mean, stats.var, axis=axis,
                                    out=out) is out
    np.testing.assert_array_equal(host(out), host(expected_y))

    expected_dx = nbn.batch_norm_backward(dyd, xd, None, stats, axis=axis)[0]
    out = make_out()
    assert nbn.batch_norm_backward(dyd, xd, None, stats, axis=axis, out=out)[0] is out
    np.testing.assert_array_equal(host(out), host(expected_dx))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("axis", [-1, 1])
def test_in_place(axis, dtype):
    rng = np.random.default_rng(10)
    x = rng.standard_normal((3, 4, 2, 3)).astype(dtype)
    dy = rng.standard_normal(x.shape).astype(dtype)
    xd, dyd = dev(x), dev(dy)
    expected_y, stats = nbn.batch_norm_train(xd, axis=axis)
    expected_dx = nbn.batch_norm_backward(dyd, xd, None, stats, axis=axis)[0]
    dx = nbn.batch_norm_backward(dyd, xd, None, stats, axis=axis, out=dyd)[0]
    assert dx is dyd
    np.testing.assert_array_equal(host(dyd), host(expected_dx))
    y, _ = nbn.batch_norm_train(xd, axis=axis, out=xd)
    assert y is xd
    np.testing.assert_array_equal(host(xd), host(expected_y))
