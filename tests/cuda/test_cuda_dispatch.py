"""Dispatch by where the arrays live, and the CPU's validation on GPU arrays."""

import numpy as np
import pytest

import numbabn as nbn
from cuda_helpers import dev, host
from numbabn import _device

RNG = np.random.default_rng(0)
X = RNG.standard_normal((8, 4)).astype(np.float32)
C4 = np.ones(4)


def test_gpu_arrays_are_recognized_without_an_interface():
    d = dev(X)
    assert _device.is_device_array(d)
    assert not _device.is_device_array(X) and not _device.is_device_array([1.0])
    assert not _device.is_device_array(None)


def test_results_stay_on_the_gpu():
    y, stats = nbn.batch_norm_train(dev(X), C4, C4)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dev(X), dev(X), C4, stats)
    y_inf = nbn.batch_norm_inference(dev(X), None, None, stats.mean, stats.var)
    for a in (y, *stats, dx, dgamma, dbeta, y_inf):
        assert _device.is_device_array(a) and getattr(type(a), "__cuda_ndarray__", False)
    assert isinstance(stats, nbn.BatchStats)


def test_host_and_gpu_vectors_give_the_same_bits():
    rng = np.random.default_rng(1)
    gamma, beta = rng.uniform(0.5, 2, 4), rng.standard_normal(4)
    xd = dev(X)
    y_host, _ = nbn.batch_norm_train(xd, gamma, beta)
    y_dev, _ = nbn.batch_norm_train(xd, dev(gamma), dev(beta))
    np.testing.assert_array_equal(host(y_host), host(y_dev))
    g32, b32 = gamma.astype(np.float32), beta.astype(np.float32)
    y32_host, _ = nbn.batch_norm_train(xd, g32, b32)
    y32_dev, _ = nbn.batch_norm_train(xd, dev(g32), dev(b32))  # widened on the GPU
    np.testing.assert_array_equal(host(y32_host), host(y32_dev))


MIXED = [
    ("train", lambda: nbn.batch_norm_train(dev(X), out=np.empty_like(X)), ["x", "out"]),
    ("train", lambda: nbn.batch_norm_train(X, out=dev(X)), ["x", "out"]),
    ("inference", lambda: nbn.batch_norm_inference(X, None, None, C4, C4, out=dev(X)),
     ["x", "out"]),
    ("backward", lambda: nbn.batch_norm_backward(
        X, dev(X), None, nbn.batch_norm_train(X)[1]), ["x", "dy"]),
    ("backward", lambda: nbn.batch_norm_backward(
        dev(X), dev(X), None, nbn.batch_norm_train(X)[1], out=np.empty_like(X)),
     ["x", "dy", "out"]),
    ("update", lambda: nbn.update_moving_stats(dev(C4), C4.copy(), nbn.batch_norm_train(X)[1]),
     ["moving_mean", "moving_var"]),
]


@pytest.mark.parametrize("call,names", [m[1:] for m in MIXED], ids=[m[0] for m in MIXED])
def test_mixing_host_and_gpu_full_size_arrays_is_a_type_error(call, names):
    with pytest.raises(TypeError, match="must be all host arrays or all GPU arrays") as info:
        call()
    for name in names:
        assert f"{name} is a " in str(info.value)


def test_gpu_vectors_with_host_data_are_a_type_error():
    with pytest.raises(TypeError, match="gamma is a GPU array but x is a host array"):
        nbn.batch_norm_train(X, dev(C4))
    _, gpu_stats = nbn.batch_norm_train(dev(X))
    with pytest.raises(TypeError, match="stats.mean is a GPU array but x is a host array"):
        nbn.batch_norm_backward(X, X, None, gpu_stats)
    with pytest.raises(TypeError,
                       match="stats.mean is a GPU array but moving_mean is a host array"):
        nbn.update_moving_stats(np.zeros(4), np.ones(4), gpu_stats)


def _gpu_stats():
    return nbn.batch_norm_train(dev(X))[1]


# (call, bad argument) on host arrays; each runs once with host arrays and once with
# every array on the GPU, and must raise the same exception with the same message
DEFAULTS = {
    "train": dict(x=X, gamma=C4, beta=C4),
    "inference": dict(x=X, gamma=C4, beta=C4, moving_mean=C4, moving_var=C4),
    "backward": dict(dy=X, x=X, gamma=C4),
}
CALLS = {"train": lambda x, **kw: nbn.batch_norm_train(x, **kw),
         "inference": lambda x, **kw: nbn.batch_norm_inference(x, **kw),
         "backward": nbn.batch_norm_backward}
PARITY = [
    ("train", dict(x=np.ones(4, np.float32))),
    ("train", dict(x=np.ones((8, 4), np.int64))),
    ("train", dict(axis=2)),
    ("train", dict(axis=1.0)),
    ("train", dict(x=np.ones((0, 4), np.float32))),
    ("train", dict(gamma=np.ones(3))),
    ("train", dict(beta=np.ones((4, 1)))),
    ("train", dict(gamma=np.ones(4, np.int32))),
    ("train", dict(eps=0.0)),
    ("train", dict(out=np.empty((8, 5), np.float32))),
    ("train", dict(out=np.empty((8, 4), np.float64))),
    ("inference", dict(moving_mean=np.ones(5))),
    ("inference", dict(moving_var=np.ones(2))),
    ("backward", dict(dy=np.ones((8, 4), np.float64))),
    ("backward", dict(dy=np.ones((8, 3), np.float32))),
    ("backward", dict(stats=(1, 2))),
    ("backward", dict(gamma=np.ones(7))),
    ("backward", dict(axis=0, gamma=None)),
]


@pytest.mark.parametrize("call,bad", PARITY,
                         ids=[f"{c}-{'-'.join(b)}-{i}" for i, (c, b) in enumerate(PARITY)])
def test_bad_input_raises_as_on_the_cpu(call, bad):
    host_kw = dict(DEFAULTS[call], **bad)
    gpu_kw = {name: dev(v) if isinstance(v, np.ndarray) else v
              for name, v in host_kw.items()}
    if call == "backward":
        host_kw.setdefault("stats", nbn.batch_norm_train(X)[1])
        gpu_kw.setdefault("stats", _gpu_stats())
    with pytest.raises((TypeError, ValueError)) as on_cpu:
        CALLS[call](**host_kw)
    with pytest.raises(on_cpu.type) as on_gpu:
        CALLS[call](**gpu_kw)
    assert str(on_gpu.value) == str(on_cpu.value)


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # simulator's NumPy
def test_negative_moving_var():
    """Checked on host vectors as on the CPU; a GPU vector is not read back to check."""
    xd = dev(X)
    bad = -C4
    with pytest.raises(ValueError, match="moving_var must be non-negative"):
        nbn.batch_norm_inference(xd, None, None, C4, bad)
    y = host(nbn.batch_norm_inference(xd, None, None, C4, dev(bad)))
    assert np.all(np.isnan(y))


def test_out_overlapping_input_partly_is_rejected():
    big = dev(np.random.default_rng(2).standard_normal((9, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="overlaps an input"):
        nbn.batch_norm_train(big[1:], out=big[:-1])


def test_errors_leave_outputs_untouched():
    out = dev(np.full_like(X, 7.0))
    with pytest.raises(ValueError):
        nbn.batch_norm_train(dev(X), np.ones(3), out=out)
    assert np.all(host(out) == 7.0)


def test_update_moving_stats_errors_on_the_gpu():
    stats = _gpu_stats()
    with pytest.raises(ValueError, match=r"moving_mean must have shape \(4,\)"):
        nbn.update_moving_stats(dev(np.zeros(3)), dev(np.ones(3)), stats)
    with pytest.raises(TypeError, match="moving_mean must be a floating-point"):
        nbn.update_moving_stats(dev(np.zeros(4, np.int64)), dev(np.ones(4)), stats)


def test_show_config_reports_cuda():
    import io

    buf = io.StringIO()
    nbn.show_config(file=buf)
    assert "CUDA: available" in buf.getvalue()
