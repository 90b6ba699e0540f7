"""The one-call operations (``_kernels_cpu``'s whole operations) equal the passes run
one by one (``numbabn.stages``) bit for bit, on every layout, dtype and option."""

import numpy as np
import pytest

import numbabn as nbn
from cases import CASES, DTYPES, case_id, make_inputs
from numbabn import stages


def _bits_equal(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("affine", [True, False])
def test_whole_operations_equal_their_passes(case, dtype, affine):
    shape, axis = case
    x, dy, gamma, beta = make_inputs(shape, axis, dtype, seed=7, loc=3.0)
    if not affine:
        gamma = beta = None

    y, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-3)
    moments = stages.batch_moments(x, axis)
    _bits_equal(stats.mean, moments.mean)
    _bits_equal(stats.var, moments.var)
    invstd = 1.0 / np.sqrt(moments.var + 1e-3)
    _bits_equal(stats.invstd, invstd)
    _bits_equal(y, stages.batch_norm_apply(x, gamma, beta, moments.mean, invstd, axis))

    sums = stages.batch_norm_grad_sums(dy, x, moments.mean, axis)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis=axis)
    _bits_equal(dbeta, sums[0])
    _bits_equal(dgamma, sums[1] * invstd)
    _bits_equal(dx, stages.batch_norm_grad_input(dy, x, gamma, moments.mean, invstd, sums,
                                                 moments.count, axis))

    mm, mv = stats.mean * 0.5, stats.var * 2.0
    y_inf = nbn.batch_norm_inference(x, gamma, beta, mm, mv, axis=axis, eps=1e-3)
    _bits_equal(y_inf, stages.batch_norm_apply(x, gamma, beta, mm, 1.0 / np.sqrt(mv + 1e-3),
                                               axis))


def _all_outputs(x, dy, gamma, beta, axis):
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis)
    y_inf = nbn.batch_norm_inference(x, gamma, beta, stats.mean, stats.var, axis=axis)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis=axis)
    moments = stages.batch_moments(x, axis)
    sums = stages.batch_norm_grad_sums(dy, x, moments.mean, axis)
    applied = stages.batch_norm_apply(x, gamma, beta, moments.mean, stats.invstd, axis)
    grad = stages.batch_norm_grad_input(dy, x, gamma, moments.mean, stats.invstd, sums,
                                        moments.count, axis)
    return [y, *stats, y_inf, dx, dgamma, dbeta, moments.mean, moments.var, *sums, applied,
            grad]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_serial_twins_equal_the_parallel_kernels(case, dtype, monkeypatch):
    """Small inputs run serial twins of the kernels (``_kernels_cpu.SERIAL``); forcing
    the parallel kernels on the same inputs gives the same bits."""
    from numbabn import _kernels_cpu, _runtime, config

    shape, axis = case
    x, dy, gamma, beta = make_inputs(shape, axis, dtype, seed=11, loc=1e3)
    assert x.size < config.SERIAL_BELOW
    ran = []

    def counted(twin):
        def call(*args):
            ran.append(twin)
            return twin(*args)
        return call

    monkeypatch.setattr(_runtime, "SERIAL",
                        {f: counted(twin) for f, twin in _kernels_cpu.SERIAL.items()})
    serial = _all_outputs(x, dy, gamma, beta, axis)
    assert len(ran) == 7  # 3 operations and 4 single passes, each a twin
    monkeypatch.setattr(config, "SERIAL_BELOW", 0)
    parallel = _all_outputs(x, dy, gamma, beta, axis)
    assert len(ran) == 7
    for a, b in zip(serial, parallel):
        _bits_equal(a, b)


_ELEMENTS = {np.dtype(np.float32): "float32", np.dtype(np.float64): "float64",
             np.dtype(np.float16): "uint16"}


@pytest.mark.parametrize("case", CASES + [((2000, 40), -1), ((4, 3, 300, 200), 1),
                                          ((64, 8, 10, 10), 1), ((64, 10, 10, 8), 3)],
                         ids=case_id)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step, in_place", [(1, False), (-1, False), (1, True)],
                         ids=["in order", "reversed", "in place"])
def test_c_entry_points_equal_the_whole_operations(case, dtype, step, in_place):
    """numbabn's TensorFlow op runs the passes' tasks through the C entry points on
    TensorFlow's thread pool, in any split and order: one task per call, in order or
    reversed, gives the NumPy API's bits (several tasks per pass in the added cases:
    rows, runs longer than a chunk, short runs); so do outputs written over their input
    (the op's in-place calls, compiled apart: ``_kernels_cpu._into``)."""
    from helpers import c_entry_point_ops

    shape, axis = case
    x, dy, gamma, beta = make_inputs(shape, axis, dtype, seed=13, loc=50.0)
    train, backward = c_entry_point_ops(_ELEMENTS[np.dtype(dtype)], shape, axis, step,
                                        in_place)
    y, mean, var, invstd = train(x, gamma, beta, 1e-3)
    dx, dgamma, dbeta = backward(dy, x, gamma, mean, invstd)
    want_y, stats = nbn.batch_norm_train(x, gamma, beta, axis=axis, eps=1e-3)
    want = nbn.batch_norm_backward(dy, x, gamma, stats, axis=axis)
    for got, expected in zip((y, mean, var, invstd, dx, dgamma, dbeta),
                             (want_y, *stats, *want)):
        _bits_equal(got, expected)
