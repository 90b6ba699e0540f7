"""numbabn.torch's modules as torch.nn modules: construction, state, convert, bad input,
memory formats read in place, and what importing pulls in."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import torch_cases as tc  # noqa: E402
from torch.nn.modules.batchnorm import _BatchNorm  # noqa: E402

import numbabn.torch as nbt  # noqa: E402
from numbabn import _cpu  # noqa: E402
from numbabn.torch import _bridge, modules  # noqa: E402

README = Path(__file__).parent.parent / "README.md"


@pytest.mark.parametrize("kind", [1, 2, 3])
def test_same_module_contract_as_torch(kind):
    ours, stock = tc.OURS[kind](7), tc.STOCK[kind](7)
    assert isinstance(ours, _BatchNorm)
    assert repr(ours).split("(", 1)[1] == repr(stock).split("(", 1)[1]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in stock.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in stock.named_buffers()]
    for name, t in stock.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], t)
    assert (ours.eps, ours.momentum, ours.affine, ours.track_running_stats) == (1e-5, 0.1, True,
                                                                               True)
    m = tc.OURS[kind](3, 1e-3, None, False, False, dtype=torch.float64)
    assert (m.eps, m.momentum, m.weight, m.running_mean, m.num_batches_tracked) == (
        1e-3, None, None, None, None)
    assert tc.OURS[kind](3, bias=False).bias is None


@pytest.mark.parametrize("direction", ["torch->numbabn", "numbabn->torch"])
def test_state_dict_round_trips(direction):
    ours, stock = tc.OURS[2](4, momentum=None), tc.STOCK[2](4, momentum=None)
    x = tc.make_x((3, 4, 5, 5), torch.contiguous_format, torch.float32, seed=1)
    source, target = (stock, tc.OURS[2](4)) if direction == "torch->numbabn" else (
        ours, tc.STOCK[2](4))
    for _ in range(2):
        source(x)
    target.load_state_dict(source.state_dict(), strict=True)
    for name, t in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], t), name
    source.eval()
    target.eval()
    tc.assert_close(target(x), source(x).double(), torch.float32, "eval output")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 4 * 4, 6),
                            torch.nn.BatchNorm1d(6, momentum=None, affine=False)),
        torch.nn.Unflatten(1, (1, 1, 2, 3)), torch.nn.BatchNorm3d(1, track_running_stats=False),
        torch.nn.SyncBatchNorm(1),  # a subclass of _BatchNorm: not one of the stock three
    ).double()


def test_convert_both_ways_carries_everything():
    model = _model()
    model[1].weight.requires_grad_(False)
    model[2][2].eval()
    before = {name: t for name, t in model.state_dict().items()}
    params = {name: p for name, p in model.named_parameters()}
    converted = nbt.convert(model)
    assert converted is model
    assert [type(m) for m in (model[1], model[2][2], model[4])] == [
        nbt.BatchNorm2d, nbt.BatchNorm1d, nbt.BatchNorm3d]
    assert type(model[5]) is torch.nn.SyncBatchNorm
    for name, p in model.named_parameters():
        assert p is params[name]  # the same tensors: optimizers keep working
    assert not model[1].weight.requires_grad and model[1].weight.dtype == torch.float64
    assert not model[2][2].training and model[1].training
    assert model[2][2].momentum is None and model[4].running_mean is None
    assert model.state_dict().keys() == before.keys()

    back = nbt.convert(model, to="torch")
    assert [type(m) for m in (back[1], back[2][2], back[4])] == [
        torch.nn.BatchNorm2d, torch.nn.BatchNorm1d, torch.nn.BatchNorm3d]
    for name, p in back.named_parameters():
        assert p is params[name]


def test_converted_model_computes_what_the_stock_one_does():
    stock, ours = _model()[:5], nbt.convert(_model()[:5])
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    for _ in range(2):
        tc.assert_close(ours(x), stock(x), torch.float64, "train")
    for a, b in zip(ours.state_dict().values(), stock.state_dict().values()):
        tc.assert_close(a, b, torch.float64, "state")


def test_convert_a_bare_module_and_bad_targets():
    bn = torch.nn.BatchNorm1d(3)
    ours = nbt.convert(bn)
    assert type(ours) is nbt.BatchNorm1d and ours.weight is bn.weight
    assert type(nbt.convert(ours, to="torch")) is torch.nn.BatchNorm1d
    with pytest.raises(ValueError, match='to must be "numbabn" or "torch"'):
        nbt.convert(bn, to="keras")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nbt.convert([bn])


def _errors(module_pair, x):
    """(exception of ours, exception of torch's) on ``x``."""
    caught = []
    for m in module_pair:
        with pytest.raises(Exception) as info:
            m(x)
        caught.append(info.value)
    return caught


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_bad_input_fails_like_torch(training):
    pair = (nbt.BatchNorm2d(3).train(training), torch.nn.BatchNorm2d(3).train(training))
    ours, theirs = _errors(pair, torch.randn(2, 4, 5, 5))
    assert type(ours) is type(theirs) is RuntimeError
    assert "should contain 4 elements not 3" in str(ours) and "num_features=3" in str(ours)
    ours, theirs = _errors(pair, torch.randn(2, 3, 5))
    assert type(ours) is type(theirs) is ValueError and str(ours) == str(theirs)
    ours, theirs = _errors(pair, torch.ones(2, 3, 4, 4, dtype=torch.int64))
    assert type(ours) is type(theirs) is NotImplementedError
    assert '"batch_norm" not implemented' in str(ours) and "int64" in str(ours)
    ours, theirs = _errors(pair, torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert type(ours) is type(theirs) is RuntimeError and "mixed dtype" in str(ours)


def test_one_value_per_channel_fails_like_torch_in_training_only():
    pair = (nbt.BatchNorm1d(3), torch.nn.BatchNorm1d(3))
    ours, theirs = _errors(pair, torch.randn(1, 3))
    assert type(ours) is type(theirs) is ValueError and str(ours) == str(theirs)
    for m in pair:
        m.eval()
    torch.testing.assert_close(pair[0](torch.ones(1, 3)), pair[1](torch.ones(1, 3)))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_batch_as_torch(training):
    ours, oracle = tc.pair(2, 3, torch.float32)
    oracle = oracle.float()
    for m in (ours, oracle):
        m.train(training)
        x = torch.randn(0, 3, 4, 4, requires_grad=True)
        y = m(x)
        y.sum().backward()
        assert y.shape == x.shape and x.grad.shape == x.shape
    assert torch.equal(ours.weight.grad, oracle.weight.grad)
    assert torch.equal(ours.bias.grad, oracle.bias.grad)
    for name, t in oracle.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name


@pytest.mark.parametrize("missing", ["running_mean", "running_var"])
def test_eval_without_a_running_statistic_fails_like_torch(missing):
    """A buffer set to None by hand: eval mode needs both (torch's RuntimeError, not a
    crash of the compiled op)."""
    x = torch.randn(4, 3)
    for m in (torch.nn.BatchNorm1d(3), nbt.BatchNorm1d(3)):
        setattr(m, missing, None)
        with pytest.raises(RuntimeError, match=f"{missing} must be defined in evaluation mode"):
            m.eval()(x)


def test_mixed_devices_name_both():
    m = nbt.BatchNorm1d(3)
    with pytest.raises(RuntimeError, match="input is on meta and weight on cpu"):
        m(torch.empty(4, 3, device="meta"))


@pytest.mark.parametrize("layout", tc.LAYOUTS, ids=tc.LAYOUT_IDS)
def test_memory_formats_are_read_and_written_in_place(layout, monkeypatch):
    """On the Python path the kernels get views of the tensor's own storage (no copy of
    x, dy or y). (The compiled op's counterpart: tests/test_torch_native.py.)"""
    monkeypatch.setattr(modules, "_NATIVE_ENABLED", False)
    _, shape, kind, memory_format = layout
    views = []
    real_prepare, real_output = _cpu.prepare, _cpu._output

    def prepare(x, axis):
        result = real_prepare(x, axis)
        views.append((x, result[1]))
        return result

    def output(out, x, layout):
        result = real_output(out, x, layout)
        assert result[0] is out and result[2] is None  # written straight into out
        return result

    monkeypatch.setattr(_cpu, "prepare", prepare)
    monkeypatch.setattr(_cpu, "_output", output)
    m = tc.OURS[kind](shape[1])
    x = tc.make_x(shape, memory_format, torch.float32, seed=0).requires_grad_(True)
    for mode in (True, False):
        views.clear()
        y = m.train(mode)(x)
        y.backward(torch.ones_like(y))
        assert y.is_contiguous(memory_format=memory_format)
        assert len(views) >= 2  # forward, backward (eval: two passes)
        for array, view in views:
            assert np.shares_memory(array, view)
        assert np.shares_memory(views[0][0], x.detach().numpy())


@pytest.mark.parametrize("layout", tc.LAYOUTS, ids=tc.LAYOUT_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_parameters_as_views_give_the_bits_of_float64_copies(layout, dtype):
    """Small inputs get the parameters' own NumPy views (no float64 copy, see
    ``_bridge._param_arrays``): train, eval and both backwards give the bits of the
    kernels called on float64 copies of the parameters, and nothing is copied."""
    _, shape, kind, memory_format = layout
    m = tc.pair(kind, shape[1], dtype, seed=3)[0]
    with torch.no_grad():
        m.running_mean.uniform_(-1.0, 1.0)
        m.running_var.uniform_(0.5, 2.0)
    x = tc.make_x(shape, memory_format, dtype, seed=4)
    dy = tc.make_x(shape, memory_format, dtype, seed=5)
    views = _bridge._param_arrays(x.numel(), m.weight, m.bias, m.running_mean, m.running_var)
    for view, t in zip(views, (m.weight, m.bias, m.running_mean, m.running_var)):
        own = t.detach().numpy()
        assert view.dtype == own.dtype and np.shares_memory(view, own)
    w, b, rm, rv = (t.detach().numpy().astype(np.float64)
                    for t in (m.weight, m.bias, m.running_mean, m.running_var))
    xa, dya = x.numpy(), dy.numpy()

    y, mean, var, invstd = _bridge.train_direct(x, m.weight, m.bias, m.eps)
    y64, mean64, var64, invstd64 = _cpu.train(xa, 1, w, b, m.eps)
    for got, want in ((y.numpy(), y64), (mean, mean64), (var, var64), (invstd, invstd64)):
        np.testing.assert_array_equal(got, want)
    y = _bridge.inference_direct(x, m.weight, m.bias, m.running_mean, m.running_var, m.eps)
    np.testing.assert_array_equal(y.numpy(), _cpu.inference(xa, 1, w, b, rm, rv, m.eps))
    dx, dw, db = _bridge.backward_direct(dy, x, m.weight, mean64, invstd64, True)
    for got, want in zip((dx.numpy(), dw, db), _cpu.backward(dya, xa, 1, w, mean64, invstd64)):
        np.testing.assert_array_equal(got, want)
    invstd_rs = 1.0 / np.sqrt(rv + m.eps)
    got = _bridge.backward_direct(dy, x, m.weight, rm, invstd_rs, False)
    out = np.empty_like(xa)
    want = _bridge._constant_stats_backward(dya, xa, w, rm, invstd_rs, out)
    np.testing.assert_array_equal(got[0].numpy(), out)
    np.testing.assert_array_equal(got[1], want[0])
    np.testing.assert_array_equal(got[2], want[1])


@pytest.mark.parametrize("view", ["strided", "CNHW", "expanded-dy"])
def test_other_strides_work_and_keep_torchs_output_strides(view):
    """Beyond the standard formats: a strided view (copied once by numbabn), a dense
    permutation torch keeps in empty_like, and an expanded (stride-0) gradient."""
    x = tc.make_x((4, 5, 6, 12), torch.contiguous_format, torch.float64, seed=2)
    if view == "strided":
        x = x[:, :, :, ::2]
    elif view == "CNHW":
        x = x.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)
    ours, oracle = tc.pair(2, 5, torch.float64)
    dy = torch.ones(()).expand(x.shape) if view == "expanded-dy" else torch.ones_like(x)

    def run(module):
        leaf = x.detach().requires_grad_(True)  # detach keeps the view's strides
        y = module(leaf)
        y.backward(dy)
        return y, leaf.grad, module.weight.grad, module.bias.grad

    got, want = run(ours), run(oracle)
    assert got[0].stride() == torch.empty_like(x).stride()
    if view == "CNHW":
        assert got[0].stride() == x.stride()
    for name, a, b in zip(("y", "dx", "dweight", "dbias"), got, want):
        tc.assert_close(a, b, torch.float64, name)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
# (8, 16, 32, 32) float32 is over _bridge.NUMPY_OUTPUT_BYTES: its outputs come from the pool
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (8, 16, 32, 32)])
def test_in_place_ops_may_follow_the_module(shape, memory_format):
    """As after torch's module, an in-place op (ResNet's ``ReLU(inplace=True)``) may
    modify the output in training and in eval: it is no view of another tensor."""
    x = tc.make_x(shape, memory_format, torch.float32, seed=4)
    ours, oracle = tc.pair(2, shape[1], torch.float32)
    for training in (True, False):
        results = []
        for module, dtype in ((ours, torch.float32), (oracle, torch.float64)):
            module.train(training)
            leaf = x.detach().to(dtype).requires_grad_(True)
            y = module(leaf)
            assert y._base is None
            torch.relu_(y)
            y.sum().backward()
            results.append((y, leaf.grad))
        for name, a, b in zip(("y", "dx"), *results):
            tc.assert_close(a, b, torch.float32, f"{name} training={training}")


def test_readme_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if "import numbabn.torch" in b)
    namespace = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    assert type(namespace["stock"][1]) is torch.nn.BatchNorm2d
    assert int(namespace["stock"][1].num_batches_tracked) == 1


def test_imports_stay_apart():
    """numbabn never imports torch; numbabn.torch on CPU tensors never imports numba.cuda."""
    code = (
        "import sys, numbabn\n"
        "assert 'torch' not in sys.modules\n"
        "import torch, numbabn.torch as nbt\n"
        "nbt.BatchNorm2d(3)(torch.randn(2, 3, 4, 4)).sum().backward()\n"
        "assert 'numba.cuda' not in sys.modules, 'numba.cuda imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
