"""``_device.on_stream``: numbabn's GPU work queued on a caller's stream (numbabn.torch
passes PyTorch's current one), with the same results as on Numba's default stream."""

import numpy as np
from numba import cuda

import numbabn as nbn
from cuda_helpers import dev, host, transposed
from numbabn import _cuda, _device

RNG = np.random.default_rng(3)
X = RNG.standard_normal((6, 5, 7)).astype(np.float32) * 2 + 1
DY = RNG.standard_normal((6, 7, 5)).astype(np.float32)
GAMMA, BETA = RNG.uniform(0.5, 2, 5), RNG.standard_normal(5)


def _all_passes():
    """train, backward (dy strided unlike x: copied into x's order) and inference, with
    host vectors (copied to the GPU): every launch, allocation and copy numbabn makes."""
    x = dev(X)
    y, stats = nbn.batch_norm_train(x, GAMMA, BETA, axis=1)
    dx, dgamma, dbeta = nbn.batch_norm_backward(transposed(dev(DY), (0, 2, 1)), x, GAMMA,
                                                stats, axis=1)
    y_inf = nbn.batch_norm_inference(x, GAMMA, BETA, stats.mean, stats.var, axis=1)
    return [host(a) for a in (y, *stats, dx, dgamma, dbeta, y_inf)]


def test_work_on_a_stream_gives_the_default_streams_bits(monkeypatch):
    expected = _all_passes()
    launched_on = []
    real_launch = _cuda._launch

    def launch(kernel, grid, block):
        launched_on.append(_device.current_stream())
        return real_launch(kernel, grid, block)

    monkeypatch.setattr(_cuda, "_launch", launch)
    stream = cuda.stream()
    with _device.on_stream(stream):
        got = _all_passes()
    stream.synchronize()
    assert _device.current_stream() == 0  # restored
    assert launched_on and all(s is stream for s in launched_on)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
