"""numbabn.torch against torch.nn.BatchNorm*d: every option, layout and dtype, train and eval.

The oracle is stock PyTorch in float64 on the same (rounded) inputs: its results are
exact to float64 rounding, so ours, computed in float64 and rounded once to the storage
dtype, must agree within that dtype's rounding (``torch_cases.tolerance``). Compared
after each of several training steps and in eval mode: outputs (and their strides),
gradients of the input, weight and bias, running statistics and num_batches_tracked.
"""

import pytest

torch = pytest.importorskip("torch")

import torch_cases as tc  # noqa: E402
from torch_cases import path  # noqa: E402,F401 - the fixture

# every test on both eager CPU paths (the compiled op and the Python path)
pytestmark = pytest.mark.usefixtures("path")

OPTIONS = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.3, affine=False),
    dict(bias=False),
    dict(track_running_stats=False),
    dict(track_running_stats=False, affine=False),
]
OPTION_IDS = ["default", "cumulative", "no-affine", "no-bias", "untracked",
              "untracked-no-affine"]


def _compare(ours, oracle, xs, dtype, training):
    ours.train(training)
    oracle.train(training)
    for i, x in enumerate(xs):
        dy = tc.make_x(x.shape, torch.contiguous_format, dtype, seed=100 + i, loc=0.0, scale=1.0)
        got, want = tc.step(ours, x, dy), tc.step(oracle, x.to(torch.float64),
                                                  dy.to(torch.float64))
        mode = "train" if training else "eval"
        assert got[0].dtype == dtype and got[0].stride() == x.stride()
        for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
            assert (a is None) == (b is None), name
            if a is not None:
                assert a.dtype == (dtype if name in ("y", "dx") else ours.weight.dtype)
                tc.assert_close(a, b, dtype, f"{mode} step {i}: {name}")
        for name in ("running_mean", "running_var"):
            a, b = getattr(ours, name), getattr(oracle, name)
            assert (a is None) == (b is None), name
            if a is not None:
                tc.assert_close(a, b, dtype, f"{mode} step {i}: {name}")
        if oracle.num_batches_tracked is not None:
            assert int(ours.num_batches_tracked) == int(oracle.num_batches_tracked)
        else:
            assert ours.num_batches_tracked is None


@pytest.mark.parametrize("options", OPTIONS, ids=OPTION_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", tc.LAYOUTS, ids=tc.LAYOUT_IDS)
def test_train_then_eval_match_torch(layout, dtype, options):
    _, shape, kind, memory_format = layout
    ours, oracle = tc.pair(kind, shape[1], dtype, **options)
    xs = [tc.make_x(shape, memory_format, dtype, seed) for seed in range(3)]
    _compare(ours, oracle, xs, dtype, training=True)
    _compare(ours, oracle, xs[:1], dtype, training=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", tc.LAYOUTS, ids=tc.LAYOUT_IDS)
def test_half_precision_within_its_rounding(layout, dtype):
    _, shape, kind, memory_format = layout
    ours, oracle = tc.pair(kind, shape[1], dtype)
    xs = [tc.make_x(shape, memory_format, dtype, seed) for seed in range(2)]
    _compare(ours, oracle, xs, dtype, training=True)
    _compare(ours, oracle, xs[:1], dtype, training=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_input_with_float32_parameters(dtype):
    """torch's mixed mode (as under autocast): half input, float32 module."""
    ours, oracle = tc.pair(2, 5, torch.float32)
    x = tc.make_x((4, 5, 6, 7), torch.channels_last, dtype, seed=3)
    y, dx, dw, db = tc.step(ours, x, torch.ones_like(x))
    want = tc.step(oracle, x.to(torch.float64), torch.ones_like(x, dtype=torch.float64))
    assert y.dtype == dtype and dw.dtype == torch.float32
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), (y, dx, dw, db), want):
        tc.assert_close(a, b, dtype, name)
    tc.assert_close(ours.running_var, oracle.running_var, torch.float32, "running_var")


def test_stock_float32_is_within_float32_rounding_of_ours():
    """The direct comparison too: stock torch in float32 against ours in float32, allowing
    each its float32 rounding and torch's float32 accumulation over n terms."""
    ours, _ = tc.pair(2, 5, torch.float32)
    stock = tc.STOCK[2](5)
    stock.load_state_dict(ours.state_dict())
    x = tc.make_x((8, 5, 9, 9), torch.channels_last, torch.float32, seed=4)
    for _ in range(3):
        a, b = ours(x), stock(x)
    n = x.numel() // 5
    tol = 2 * tc.tolerance(torch.float32) + 6e-8 * n ** 0.5
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * 4)
    torch.testing.assert_close(ours.running_var, stock.running_var, rtol=tol, atol=tol)
