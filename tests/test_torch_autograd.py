"""numbabn.torch's operators under autograd and torch.compile."""

import copy
import time

import pytest

torch = pytest.importorskip("torch")

import torch_cases as tc  # noqa: E402
from torch_cases import path  # noqa: E402,F401 - the fixture (both eager CPU paths)

import numbabn.torch as nbt  # noqa: E402


@pytest.mark.usefixtures("path")
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(training, memory_format):
    torch.manual_seed(0)
    m = nbt.BatchNorm2d(3, dtype=torch.float64).train(training)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2.0)
        m.bias.normal_()
        m.running_mean.normal_()
        m.running_var.uniform_(0.5, 2.0)
    x = tc.make_x((4, 3, 2, 3), memory_format, torch.float64, seed=0).requires_grad_(True)
    if training:  # gradcheck calls forward many times: keep the buffers out of it
        m.track_running_stats = False
        m.running_mean = m.running_var = m.num_batches_tracked = None

    def f(x, weight, bias):  # the module with gradcheck's perturbed parameters
        return torch.func.functional_call(m, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(f, (x, m.weight, m.bias))


@pytest.mark.usefixtures("path")
def test_double_backward_is_a_clear_error():
    m = nbt.BatchNorm1d(3, dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)
    m.eval()
    with pytest.raises(RuntimeError, match="does not support double backward"):
        torch.autograd.grad(m(x).pow(2).sum(), x, create_graph=True)


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), nbt.BatchNorm2d(4), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5), nbt.BatchNorm1d(5, momentum=None))


def _run(model, x):
    """Two training steps and an eval forward: outputs, gradients, buffers."""
    results = []
    for _ in range(2):
        model.train()
        model.zero_grad()
        y = model(x)
        y.pow(2).sum().backward()
        results += [y.detach()] + [p.grad.clone() for p in model.parameters()]
    model.eval()
    results.append(model(x).detach())
    return results + [b.clone() for b in model.buffers()]


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compile_fullgraph_matches_eager(backend):
    """No graph break (fullgraph=True raises on one) in training, backward or eval, and
    the compiled model computes what the eager one does, buffers included."""
    torch._dynamo.reset()
    eager = _model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(6, 3, 8, 8).to(memory_format=torch.channels_last)
    start = time.perf_counter()
    got = _run(compiled, x)
    print(f"\ntorch.compile(backend={backend!r}) first steps: "
          f"{time.perf_counter() - start:.1f} s")
    want = _run(eager, x)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert int(compiled_model[5].num_batches_tracked) == 2
    # another batch size: recompiled with a symbolic batch (the fake implementations
    # and the module's count arithmetic take symbolic sizes), still without a break
    for a, b in zip(_run(compiled, x[:5]), _run(eager, x[:5])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _bn_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(nbt.BatchNorm2d(3), torch.nn.Flatten(),
                                nbt.BatchNorm1d(3 * 4 * 5, momentum=None))
    with torch.no_grad():
        for m in (model[0], model[2]):
            m.weight.uniform_(0.5, 2.0)
            m.bias.normal_()
    return model


def _bn_run(model, module, modes=(True, True, False)):
    """Training steps and eval steps (``modes``; each with a backward): outputs, input
    and parameter gradients, then the buffers."""
    x = (3.0 + torch.randn(6, 3, 4, 5, generator=torch.Generator().manual_seed(1))
         ).to(memory_format=torch.channels_last)
    w = torch.randn(6, 3 * 4 * 5, generator=torch.Generator().manual_seed(2))
    out = []
    for training in modes:
        module.train(training)
        module.zero_grad()
        xg = x.clone().requires_grad_(True)
        y = model(xg)
        (y * w).sum().backward()
        out += [y.detach(), xg.grad] + [p.grad for p in module.parameters()]
    return out + list(module.buffers())


def test_eager_path_and_compiled_operators_give_the_same_bits():
    """Eager calls skip the custom-op dispatcher (``_ops.train``/``inference``: a
    ``torch.autograd.Function`` over the same bridge functions); compiled graphs call the
    operators. Both must compute the same bits: outputs, input and parameter gradients,
    running statistics (momentum None too: a float eagerly, a tensor traced)."""
    torch._dynamo.reset()
    eager = _bn_model()
    compiled_model = copy.deepcopy(eager)
    compiled = torch.compile(compiled_model, fullgraph=True, backend="aot_eager")
    for a, b in zip(_bn_run(compiled, compiled_model), _bn_run(eager, eager), strict=True):
        assert torch.equal(a, b)
