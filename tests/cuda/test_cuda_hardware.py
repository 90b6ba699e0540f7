"""Tests that need a real GPU: interop with CuPy and PyTorch, full-size inputs, timing.

Skipped under the simulator (tests/cuda/conftest.py). Run them on a GPU machine with
``pip install '.[test,cuda]'`` and ``pytest tests/cuda``.
"""

import numpy as np
import pytest
from numba import cuda

import numbabn as nbn
from cuda_helpers import DEFAULT_LAUNCHES, dev, host
from numbabn import config

pytestmark = pytest.mark.gpu_hardware


@pytest.fixture
def default_launches(monkeypatch):
    for name, value in DEFAULT_LAUNCHES.items():
        monkeypatch.setattr(config, name, value)


def test_cupy_arrays_in_and_out():
    cp = pytest.importorskip("cupy")
    x = np.random.default_rng(0).standard_normal((8, 7, 7, 16)).astype(np.float32)
    xc = cp.asarray(x)
    y, stats = nbn.batch_norm_train(xc)
    y_cpu, stats_cpu = nbn.batch_norm_train(x)
    np.testing.assert_allclose(cp.asnumpy(cp.asarray(y)), y_cpu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(host(stats.var), stats_cpu.var, rtol=1e-10)
    out = cp.empty_like(xc)
    assert nbn.batch_norm_train(xc, out=out)[0] is out
    np.testing.assert_allclose(cp.asnumpy(out), y_cpu, rtol=1e-5, atol=1e-5)


def test_torch_cuda_tensors_against_cudnn():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA device")
    x = torch.randn(8, 16, 7, 7, device="cuda") * 2 + 3
    dy = torch.randn_like(x)
    gamma, beta = torch.rand(16, device="cuda") + 0.5, torch.randn(16, device="cuda")
    y, stats = nbn.batch_norm_train(x, gamma, beta, axis=1, eps=1e-5)
    dx, dgamma, dbeta = nbn.batch_norm_backward(dy, x, gamma, stats, axis=1)
    xr = x.clone().requires_grad_()
    gr, br = gamma.clone().requires_grad_(), beta.clone().requires_grad_()
    yr = torch.nn.functional.batch_norm(xr, None, None, gr, br, training=True, eps=1e-5)
    yr.backward(dy)
    as_t = lambda a: torch.as_tensor(a, device="cuda")  # noqa: E731 - zero-copy view
    torch.testing.assert_close(as_t(y), yr.detach(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(as_t(dx), xr.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(as_t(dgamma).float(), gr.grad, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(as_t(dbeta).float(), br.grad, rtol=1e-3, atol=1e-3)
    out = torch.empty_like(dy)
    assert nbn.batch_norm_backward(dy, x, gamma, stats, axis=1, out=out)[0] is out


@pytest.mark.parametrize("shape,axis", [((64, 56, 56, 64), -1), ((64, 64, 56, 56), 1)])
def test_full_size_accuracy_and_same_bits(default_launches, shape, axis):
    x = (1e4 + np.random.default_rng(1).standard_normal(shape, np.float32)).astype(np.float32)
    xd = dev(x)
    (y1, s1), (y2, s2) = (nbn.batch_norm_train(xd, axis=axis) for _ in range(2))
    red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    mean = x.mean(axis=red, dtype=np.float64)
    var = np.zeros_like(mean)
    for i in range(0, shape[0], 8):  # float64 deviations a slab at a time
        xs = np.moveaxis(x[i:i + 8].astype(np.float64), axis, -1) - mean
        var += (xs * xs).reshape(-1, mean.size).sum(axis=0)
    var /= x.size // mean.size
    np.testing.assert_allclose(host(s1.var), var, rtol=1e-6)
    np.testing.assert_allclose(host(s1.mean), mean, rtol=1e-12)
    np.testing.assert_array_equal(host(s1.var), host(s2.var))
    np.testing.assert_array_equal(host(y1), host(y2))


def test_train_runs_near_copy_bandwidth(default_launches):
    """Loose: a training forward (2 reads + 1 write of x) within 4x of 3 copies' time."""
    x = dev(np.random.default_rng(2).standard_normal((256, 56, 56, 64), np.float32))
    y = cuda.device_array_like(x)
    start, stop = cuda.event(), cuda.event()

    def best(fn):
        fn()
        cuda.synchronize()
        times = []
        for _ in range(5):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(cuda.event_elapsed_time(start, stop))
        return min(times)

    copy_ms = best(lambda: y.copy_to_device(x))
    train_ms = best(lambda: nbn.batch_norm_train(x, out=y))
    assert train_ms < 4 * (1.5 * copy_ms), (train_ms, copy_ms)
