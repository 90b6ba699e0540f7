"""numbabn.torch on CUDA tensors: numbabn's CUDA kernels on PyTorch's current stream.

Skipped without a CUDA device (and without numba-cuda). On a GPU machine:
``python -m pytest tests/test_torch_cuda.py``.
"""

import importlib.util

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_cases as tc  # noqa: E402

import numbabn.torch as nbt  # noqa: E402
from numbabn import _device  # noqa: E402

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA device for PyTorch (torch.cuda.is_available() is "
                              "False): the CUDA path of numbabn.torch needs a GPU"),
    pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                       reason="numba-cuda is not installed (pip install 'numbabn[cuda]')"),
]

CUDA_LAYOUTS = [layout for layout in tc.LAYOUTS if layout[0] in ("NC", "NCHW", "NHWC", "NDHWC")]


def _cuda_pair(kind, channels, dtype, **options):
    ours, oracle = tc.pair(kind, channels, dtype, **options)
    return ours.cuda(), oracle.cuda()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16],
                         ids=["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", CUDA_LAYOUTS, ids=[c[0] for c in CUDA_LAYOUTS])
def test_cuda_matches_torch_float64(layout, dtype):
    _, shape, kind, memory_format = layout
    ours, oracle = _cuda_pair(kind, shape[1], dtype, momentum=None)
    for training in (True, True, False):
        ours.train(training)
        oracle.train(training)
        x = tc.make_x(shape, memory_format, dtype, seed=len(shape)).cuda()
        dy = torch.randn_like(x)
        got = tc.step(ours, x, dy)
        want = tc.step(oracle, x.double(), dy.double())
        assert got[0].device == x.device and got[0].stride() == x.stride()
        for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
            tc.assert_close(a, b, dtype, f"training={training}: {name}")
        for name in ("running_mean", "running_var"):
            tc.assert_close(getattr(ours, name), getattr(oracle, name), dtype, name)
        assert int(ours.num_batches_tracked) == int(oracle.num_batches_tracked)


def test_cuda_runs_on_torchs_current_stream():
    """Work queued on a side stream: ours must wait for it by stream order alone. A long
    sleep precedes the input's fill on that stream; kernels on another stream would read
    the input unfilled."""
    ours, oracle = _cuda_pair(2, 8, torch.float32)
    side = torch.cuda.Stream()
    x = torch.empty(16, 8, 32, 32, device="cuda").to(memory_format=torch.channels_last)
    src = tc.make_x(x.shape, torch.channels_last, torch.float32, seed=1).cuda()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU cycles
        x.copy_(src)
        y = ours(x)
        y2 = y * 1  # and PyTorch's next op waits for ours
    side.synchronize()
    tc.assert_close(y2, oracle(src.double()), torch.float32, "side stream")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_cuda_copies_nothing(monkeypatch, dtype):
    """No full-size copy: inputs are viewed in place, outputs written into torch's tensor
    (bfloat16 too: the kernels get its bits, int16, not a float32 copy)."""
    from numbabn import _cuda

    copies, kernel_dtypes = [], set()
    real = _device.copy_into
    monkeypatch.setattr(_device, "copy_into", lambda dst, src: (copies.append(dst.shape),
                                                                 real(dst, src)))
    real_prepare = _cuda._prepare
    monkeypatch.setattr(_cuda, "_prepare", lambda x, axis: (kernel_dtypes.add(str(x.dtype)),
                                                            real_prepare(x, axis))[1])
    m = nbt.BatchNorm2d(8).cuda()
    x = torch.randn(4, 8, 6, 6, device="cuda", dtype=dtype)
    x = x.to(memory_format=torch.channels_last).requires_grad_(True)
    for training in (True, False):
        y = m.train(training)(x)
        y.backward(torch.ones_like(y))
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert copies == []
    assert kernel_dtypes == {"int16" if dtype == torch.bfloat16 else "float32"}


def _bf16_bits_of(v):
    """float64 tensor -> bfloat16 bits (int16, as a NumPy array), rounded once."""
    from halves import BF16, round_to

    return round_to(v.detach().cpu().numpy(), BF16).view(np.int16)


@pytest.mark.parametrize("layout", CUDA_LAYOUTS, ids=[c[0] for c in CUDA_LAYOUTS])
def test_cuda_bfloat16_outputs_are_the_float64_results_rounded_once(layout):
    """bfloat16 CUDA tensors run the CUDA kernels on their bits: each output is the
    float64 result, recomputed here from the kernels' own statistics, rounded once to
    nearest even (ties, overflow and NaN included: tests/cuda/test_cuda_bfloat16.py)."""
    pytest.importorskip("ml_dtypes")
    from numbabn.torch import _bridge

    _, shape, _, memory_format = layout
    c = shape[1]
    x = tc.make_x(shape, memory_format, torch.bfloat16, seed=5).cuda()
    dy = tc.make_x(shape, memory_format, torch.bfloat16, seed=6, loc=0.0, scale=1.0).cuda()
    g = torch.Generator().manual_seed(7)
    weight = torch.empty(c, dtype=torch.float64).uniform_(0.5, 2.0, generator=g).cuda()
    bias = torch.randn(c, generator=g, dtype=torch.float64).cuda()
    eps = 1e-5
    view = (1, c) + (1,) * (len(shape) - 2)
    b = bias.view(view)
    x64, dy64 = x.double(), dy.double()

    y, mean, var, invstd = _bridge.train(x, weight, bias, eps)
    assert y.dtype == torch.bfloat16 and y.stride() == x.stride()
    dims = [d for d in range(len(shape)) if d != 1]
    torch.testing.assert_close(mean, x64.mean(dims), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, x64.var(dims, correction=0), rtol=1e-10, atol=1e-12)
    want = (x64 - mean.view(view)) * (invstd * weight).view(view) + b
    np.testing.assert_array_equal(y.view(torch.int16).cpu().numpy(), _bf16_bits_of(want))

    rm, rv = 0.1 * bias, 0.5 + weight
    yi = _bridge.inference(x, weight, bias, rm, rv, eps)
    want = (x64 - rm.view(view)) * ((1.0 / torch.sqrt(rv + eps)) * weight).view(view) + b
    np.testing.assert_array_equal(yi.view(torch.int16).cpu().numpy(), _bf16_bits_of(want))

    dx, dweight, dbias = _bridge.backward(dy, x, weight, mean, invstd, True)
    assert dx.dtype == torch.bfloat16 and dx.stride() == x.stride()
    n = x.numel() // c
    torch.testing.assert_close(dbias, dy64.sum(dims), rtol=1e-9, atol=1e-9)
    k_dy = invstd * weight
    k_x = k_dy * invstd * dweight / n
    want = (k_dy.view(view) * (dy64 - (dbias / n).view(view))
            - k_x.view(view) * (x64 - mean.view(view)))
    np.testing.assert_array_equal(dx.view(torch.int16).cpu().numpy(), _bf16_bits_of(want))


def test_cuda_compile_fullgraph():
    torch._dynamo.reset()
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), nbt.BatchNorm2d(4)).cuda()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 3, 8, 8, device="cuda")
    compiled(x).sum().backward()
    assert int(m[1].num_batches_tracked) == 1
