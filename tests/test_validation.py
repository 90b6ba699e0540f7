"""Bad input gets a clear TypeError / ValueError naming the argument, before any kernel."""

import numpy as np
import pytest

import numbabn as nbn

X = np.ones((8, 4), np.float32)
C4 = np.ones(4)
STATS = nbn.batch_norm_train(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32))[1]


def train(**kw):
    args = dict(x=X, gamma=C4, beta=C4, axis=-1, eps=1e-3)
    args.update(kw)
    return nbn.batch_norm_train(args.pop("x"), **args)


def inference(**kw):
    args = dict(x=X, gamma=C4, beta=C4, moving_mean=C4, moving_var=C4, axis=-1)
    args.update(kw)
    return nbn.batch_norm_inference(args.pop("x"), **args)


def backward(**kw):
    args = dict(dy=X, x=X, gamma=C4, stats=STATS, axis=-1)
    args.update(kw)
    return nbn.batch_norm_backward(**args)


CASES = [
    # (call, kwargs, exception, message fragment)
    (train, dict(x=np.ones(4, np.float32)), ValueError, "x must have at least 2 dimensions"),
    (train, dict(x=np.ones((8, 4), np.int64)), TypeError, "x must be a floating-point array"),
    (train, dict(x=np.ones((8, 4), np.complex64)), TypeError, "x must be a floating-point"),
    (train, dict(x=np.ones((8, 4), bool)), TypeError, "got dtype bool"),
    (train, dict(x=None), TypeError, "x must be an array"),
    (train, dict(axis=2), ValueError, "axis 2 is out of range"),
    (train, dict(axis=-3), ValueError, "axis -3 is out of range"),
    (train, dict(axis=1.0), TypeError, "axis must be an integer"),
    (train, dict(x=np.ones((0, 4), np.float32)), ValueError, "empty batch"),
    (train, dict(x=np.ones((8, 0), np.float32), gamma=None, beta=None), ValueError, "no channels"),
    (train, dict(x=np.ones((8, 4, 0), np.float32), axis=1), ValueError, "empty batch"),
    (train, dict(gamma=np.ones(3)), ValueError, "gamma must have shape (4,)"),
    (train, dict(beta=np.ones((4, 1))), ValueError, "beta must have shape (4,)"),
    (train, dict(gamma=np.ones(4, np.int32)), TypeError, "gamma must be a floating-point"),
    (train, dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (train, dict(eps=-1e-3), ValueError, "eps must be"),
    (train, dict(eps="1e-3"), TypeError, "eps must be a real number"),
    (train, dict(out=np.empty((8, 5), np.float32)), ValueError, "out must have shape (8, 4)"),
    (train, dict(out=np.empty((8, 4), np.float64)), TypeError, "out must have dtype float32"),
    (train, dict(out=[[0.0] * 4] * 8), TypeError, "out must be a numpy.ndarray"),
    (train, dict(out=np.ones((16, 4), np.float32)[::2]), None, None),  # strided out is fine
    (inference, dict(moving_mean=np.ones(5)), ValueError, "moving_mean must have shape (4,)"),
    (inference, dict(moving_var=np.ones(2)), ValueError, "moving_var must have shape (4,)"),
    (inference, dict(moving_var=-C4), ValueError, "moving_var must be non-negative"),
    (inference, dict(moving_mean=None), TypeError, "moving_mean must be an array"),
    (inference, dict(eps=-1e-3), ValueError, "eps must be a finite number >= 0"),
    (inference, dict(eps=0.0), None, None),  # as torch at inference
    (backward, dict(dy=np.ones((8, 4), np.float64)), TypeError, "dy must have the dtype of x"),
    (backward, dict(dy=np.ones((8, 3), np.float32)), ValueError, "dy must have the shape of x"),
    (backward, dict(stats=(1, 2)), TypeError, "stats must be the BatchStats"),
    (backward, dict(stats=nbn.BatchStats(C4[:3], C4[:3], C4[:3])), ValueError,
     "stats.mean must have shape (4,)"),
    (backward, dict(gamma=np.ones(7)), ValueError, "gamma must have shape (4,)"),
    (backward, dict(axis=0, gamma=None), ValueError, "stats.mean must have shape (8,)"),
]


@pytest.mark.parametrize("call,kwargs,exc,message", CASES,
                         ids=[f"{c[0].__name__}-{'-'.join(c[1])}-{i}" for i, c in enumerate(CASES)])
def test_bad_input_is_named(call, kwargs, exc, message):
    if exc is None:
        call(**kwargs)
        return
    with pytest.raises(exc) as info:
        call(**kwargs)
    assert message in str(info.value)


def test_update_moving_stats_errors():
    mm, mv = np.zeros(4), np.ones(4)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        nbn.update_moving_stats(mm, mv, STATS, momentum=1.5)
    with pytest.raises(ValueError, match=r"moving_mean must have shape \(4,\)"):
        nbn.update_moving_stats(np.zeros(3), mv, STATS)
    with pytest.raises(TypeError, match="moving_var must be a numpy.ndarray"):
        nbn.update_moving_stats(mm, [1.0] * 4, STATS)
    with pytest.raises(TypeError, match="moving_mean must be a floating-point"):
        nbn.update_moving_stats(np.zeros(4, np.int64), mv, STATS)
    frozen = np.ones(4)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="moving_var is read-only"):
        nbn.update_moving_stats(mm, frozen, STATS)
    with pytest.raises(TypeError, match="stats must be the BatchStats"):
        nbn.update_moving_stats(mm, mv, None)


def test_out_overlapping_input_partly_is_rejected():
    x = np.random.default_rng(1).standard_normal((9, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="overlaps an input"):
        nbn.batch_norm_train(x[1:], out=x[:-1])


def test_errors_leave_outputs_and_inputs_untouched():
    x = np.random.default_rng(2).standard_normal((8, 4)).astype(np.float32)
    out = np.full_like(x, 7.0)
    with pytest.raises(ValueError):
        nbn.batch_norm_train(x, np.ones(3), out=out)
    assert np.all(out == 7.0)
