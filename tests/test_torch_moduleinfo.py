"""PyTorch's own test inputs for its batch norms, run against numbabn.torch's.

``torch.testing._internal.common_modules.module_db`` (shipped in torch's wheel; the test
file that drives it, ``test/test_modules.py``, is not) holds a ``ModuleInfo`` for each of
``nn.BatchNorm1d/2d/3d``: the constructor and forward inputs torch tests its modules on
(affine or not, tracked statistics or not, cumulative momentum, 3-D input, an empty batch,
``bias=False``), the error inputs, and the dtypes. Every sample here is run through the
checks ``test_modules.py`` makes of a module (forward, factory kwargs, repr, pickling,
non-contiguous input, memory formats, gradcheck, errors, meta-device construction), each
time with numbabn.torch's module beside the stock one built from the same arguments:
the drop-in must agree with the original on the original's own inputs.

Where numbabn.torch differs by design the test says so and checks the difference:
double backward is a clear error (torch supports it). The CPU/GPU parity and device
transfer checks need CUDA and skip without it.
"""

import copy
import io
import pickle

import pytest

torch = pytest.importorskip("torch")

import torch_cases  # noqa: E402,F401  (torch's thread count, as the other torch tests)
from torch.testing._internal.common_modules import (  # noqa: E402
    ModuleErrorEnum, module_db)

import numbabn.torch as nbt  # noqa: E402

STOCK_TO_OURS = {torch.nn.BatchNorm1d: nbt.BatchNorm1d, torch.nn.BatchNorm2d: nbt.BatchNorm2d,
                 torch.nn.BatchNorm3d: nbt.BatchNorm3d}
INFOS = [info for info in module_db if info.module_cls in STOCK_TO_OURS]
CUDA = torch.cuda.is_available()


def test_torch_still_ships_its_batch_norm_module_infos():
    """Without them every test below would be parametrized over nothing and pass."""
    assert sorted(info.name for info in INFOS) == ["nn.BatchNorm1d", "nn.BatchNorm2d",
                                                   "nn.BatchNorm3d"]


def _cases():
    """(info, dtype, training) for every BN ModuleInfo, its CPU dtypes, both modes."""
    for info in INFOS:
        for dtype in info.dtypes:
            for training in (True, False):
                yield pytest.param(info, dtype, training,
                                   id=f"{info.formatted_name}-{str(dtype)[6:]}-"
                                      f"{'train' if training else 'eval'}")


CASES = list(_cases())


def _samples(info, dtype, training, requires_grad=False, device="cpu"):
    samples = info.module_inputs_func(info, device=device, dtype=dtype,
                                      requires_grad=requires_grad, training=training)
    assert samples, f"torch gives no inputs for {info.name}"
    return samples


def _pair(info, sample, dtype, training, device="cpu"):
    """The stock module and ours from the sample's constructor input, same state."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    stock = info.module_cls(*args, **kwargs).to(device).to(dtype)
    ours = STOCK_TO_OURS[info.module_cls](*args, **kwargs).to(device).to(dtype)
    # the constructors initialize alike (ones, zeros); parameters away from those make
    # the comparison mean something (the same ones for every call of a sample)
    with torch.no_grad():
        for i, p in enumerate(stock.parameters()):
            p.copy_(torch.linspace(0.5 - i, 1.5, p.numel()))
    ours.load_state_dict(stock.state_dict())
    stock.train(training)
    ours.train(training)
    return stock, ours


def _forward_args(sample):
    return sample.forward_input.args, sample.forward_input.kwargs


def _clone(args, requires_grad):
    return tuple(a.detach().clone().requires_grad_(requires_grad)
                 if isinstance(a, torch.Tensor) else a for a in args)


def _assert_same_state(stock, ours, what):
    torch.testing.assert_close(dict(ours.state_dict()), dict(stock.state_dict()),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("info,dtype,training", CASES)
def test_forward_backward_and_state_match_stock(info, dtype, training):
    """test_modules.py's test_forward, with the stock module as the reference: outputs,
    gradients to input and parameters, and the buffers, over two steps."""
    for sample in _samples(info, dtype, training):
        stock, ours = _pair(info, sample, dtype, training)
        args, kwargs = _forward_args(sample)
        for step in range(2):
            what = f"{info.name} {sample.desc or 'default'} step {step}"
            xs, xo = _clone(args, True), _clone(args, True)
            ys, yo = stock(*xs, **kwargs), ours(*xo, **kwargs)
            torch.testing.assert_close(yo, ys, msg=lambda m: f"{what} output: {m}")
            assert yo.dtype == ys.dtype and yo.shape == ys.shape
            if sample.reference_fn is not None:
                torch.testing.assert_close(yo, sample.reference_fn(ours, *xo, **kwargs))
            g = torch.randn_like(ys)
            ys.backward(g)
            yo.backward(g)
            torch.testing.assert_close(xo[0].grad, xs[0].grad,
                                       msg=lambda m: f"{what} input grad: {m}")
            for (name, ps), po in zip(stock.named_parameters(), ours.parameters()):
                torch.testing.assert_close(po.grad, ps.grad,
                                           msg=lambda m: f"{what} {name} grad: {m}")
            _assert_same_state(stock, ours, what)


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.formatted_name)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_factory_kwargs_place_parameters_and_buffers(info, dtype):
    """test_factory_kwargs: ``device`` and ``dtype`` reach every parameter and buffer,
    which are those of the stock module (names, shapes, dtypes)."""
    for sample in _samples(info, dtype, True):
        args, kwargs = sample.constructor_input.args, dict(sample.constructor_input.kwargs)
        kwargs.update(device="cpu", dtype=dtype)
        stock = info.module_cls(*args, **kwargs)
        ours = STOCK_TO_OURS[info.module_cls](*args, **kwargs)
        for members in ("named_parameters", "named_buffers"):
            expected = [(n, t.shape, t.dtype, t.device) for n, t in getattr(stock, members)()]
            got = [(n, t.shape, t.dtype, t.device) for n, t in getattr(ours, members)()]
            assert got == expected, sample.desc
        for _, t in ours.named_parameters():
            assert t.dtype == dtype and t.device.type == "cpu"


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.formatted_name)
def test_repr_is_torchs(info):
    """test_repr: the same text (class name and extra_repr)."""
    for sample in _samples(info, torch.float32, True):
        stock, ours = _pair(info, sample, torch.float32, True)
        assert repr(ours) == repr(stock)


@pytest.mark.parametrize("info,dtype,training", CASES)
def test_pickle_and_torch_save_round_trip(info, dtype, training):
    """test_pickle (and test_save_load): a module pickled or saved whole and loaded back
    computes the same outputs, bit for bit, and is still numbabn's."""
    for sample in _samples(info, dtype, training):
        _, ours = _pair(info, sample, dtype, training)
        args, kwargs = _forward_args(sample)
        # a training step first, so that the buffers hold something
        ours(*_clone(args, False), **kwargs)
        copies = [pickle.loads(pickle.dumps(ours))]
        buf = io.BytesIO()
        torch.save(ours, buf)
        buf.seek(0)
        copies.append(torch.load(buf, weights_only=False))
        copies.append(copy.deepcopy(ours))
        for other in copies:
            assert type(other) is type(ours) and other.training == ours.training
            _assert_same_state(ours, other, sample.desc)
            with torch.no_grad():
                expected = copy.deepcopy(ours)(*_clone(args, False), **kwargs)
                got = other(*_clone(args, False), **kwargs)
            assert torch.equal(got, expected) or (got.numel() == 0 and expected.numel() == 0)


def _noncontiguous(t):
    """``t``'s values in a tensor whose last dimension has stride 2 (torch's test makes
    its inputs non-contiguous the same way: every other element of a wider tensor)."""
    wide = torch.repeat_interleave(t.detach(), 2, dim=-1)
    return wide[..., ::2].requires_grad_(t.requires_grad)


@pytest.mark.parametrize("info,dtype,training", CASES)
def test_non_contiguous_tensors(info, dtype, training):
    """test_non_contiguous_tensors: non-contiguous input and grad_output give the
    contiguous results (ours) and the stock module's (within rounding)."""
    for sample in _samples(info, dtype, training):
        args, kwargs = _forward_args(sample)
        x = args[0]
        if x.numel() == 0:
            continue
        results = {}
        for name, make in (("contiguous", lambda t: t.detach().clone()),
                           ("noncontiguous", _noncontiguous)):
            for impl in ("stock", "ours"):
                stock, ours = _pair(info, sample, dtype, training)
                m = ours if impl == "ours" else stock
                xi = make(x).requires_grad_(True)
                y = m(xi, *args[1:], **kwargs)
                g = make(torch.ones_like(y).mul_(0.25).add_(torch.arange(
                    y.numel(), dtype=y.dtype).reshape(y.shape) % 3))
                y.backward(g)
                results[name, impl] = (y.detach(), xi.grad, [p.grad for p in m.parameters()],
                                       m.state_dict())
        for impl in ("ours", "stock"):
            got, want = results["noncontiguous", impl], results["contiguous", "stock"]
            torch.testing.assert_close(got, want, msg=lambda m: f"{sample.desc} {impl}: {m}")


@pytest.mark.parametrize("info", INFOS[1:], ids=lambda i: i.formatted_name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_memory_format(info, training):
    """test_memory_format: channels-last input gives the stock module's output values
    and memory format (2-D and 3-D modules); the module's own ``memory_format``
    conversion is a no-op for its 1-D parameters, as for the stock one."""
    fmt = torch.channels_last if info.module_cls is torch.nn.BatchNorm2d else \
        torch.channels_last_3d
    for sample in _samples(info, torch.float32, training):
        stock, ours = _pair(info, sample, torch.float32, training)
        ours = ours.to(memory_format=fmt)
        args, kwargs = _forward_args(sample)
        x = args[0].detach().contiguous(memory_format=fmt)
        ys, yo = stock(x.clone(memory_format=torch.preserve_format), **kwargs), ours(x, **kwargs)
        torch.testing.assert_close(yo, ys)
        assert yo.stride() == ys.stride(), sample.desc
        assert yo.is_contiguous(memory_format=fmt) == ys.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.formatted_name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck(info, training):
    """test_grad: ``torch.autograd.gradcheck`` in float64 on input and parameters."""
    for sample in _samples(info, torch.float64, training, requires_grad=True):
        args, kwargs = _forward_args(sample)
        if args[0].numel() == 0:
            continue
        _, ours = _pair(info, sample, torch.float64, training)
        params = tuple(ours.parameters())

        def fn(x, *ps):
            # the parameters as explicit inputs, so that gradcheck perturbs them; the
            # running statistics change between calls in training mode only, where the
            # output does not read them
            with torch.nn.utils.stateless._reparametrize_module(
                    ours, {n: p for (n, _), p in zip(ours.named_parameters(), ps)}):
                return ours(x, **kwargs)

        assert torch.autograd.gradcheck(fn, (args[0], *params), nondet_tol=0.0), sample.desc


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.formatted_name)
def test_gradgrad_is_a_clear_error_where_torch_supports_it(info):
    """test_gradgrad: torch's modules support double backward (``supports_gradgrad``);
    numbabn.torch's do not, by design, and say so instead of returning wrong values."""
    assert info.supports_gradgrad
    sample = _samples(info, torch.float64, True, requires_grad=True)[0]
    _, ours = _pair(info, sample, torch.float64, True)
    x = _forward_args(sample)[0][0]
    y = ours(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x, create_graph=False)
    assert gx.shape == x.shape
    with pytest.raises(RuntimeError, match="does not support double backward"):
        (gx,) = torch.autograd.grad(ours(x).square().sum(), x, create_graph=True)
        gx.sum().backward()


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.formatted_name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_errors_as_torch(info, training):
    """test_errors: torch's error inputs (``eps`` negative or zero) raise torch's error
    type with a message its regex matches, from our module as from the stock one. The
    regex is for training mode; in eval mode torch refuses a negative ``eps`` only
    ("non-negative"), and ``eps=0`` runs: then both modules give the same output."""
    errors = info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                           requires_grad=False, training=training)
    assert errors
    eval_zero_eps = 0
    for error in errors:
        sample = error.module_error_input
        args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
        if error.error_on == ModuleErrorEnum.CONSTRUCTION_ERROR:
            for cls in (info.module_cls, STOCK_TO_OURS[info.module_cls]):
                with pytest.raises(error.error_type, match=error.error_regex):
                    cls(*args, **kwargs)
            continue
        x = _forward_args(sample)[0][0]
        stock, ours = (cls(*args, **kwargs).train(training)
                       for cls in (info.module_cls, STOCK_TO_OURS[info.module_cls]))
        if not training and stock.eps == 0.0:
            eval_zero_eps += 1
            torch.testing.assert_close(ours(x), stock(x))
            continue
        regex = error.error_regex if training else "eps must be non-negative"
        for m in (stock, ours):
            with pytest.raises(error.error_type, match=regex):
                m(x)
                pytest.fail(f"{type(m).__module__}.{type(m).__name__} did not raise")
    assert training or eval_zero_eps, "torch's error inputs no longer include eps=0"


@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.formatted_name)
def test_meta_device_construction_and_to_empty(info):
    """test_device_ctx_init / test_to_empty: built under ``torch.device("meta")`` the
    module holds meta tensors; ``to_empty`` materializes it on the CPU, where it runs."""
    sample = _samples(info, torch.float32, True)[0]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    with torch.device("meta"):
        ours = STOCK_TO_OURS[info.module_cls](*args, **kwargs)
    assert all(t.is_meta for t in (*ours.parameters(), *ours.buffers()))
    ours.to_empty(device="cpu")
    ours.reset_parameters()
    stock = info.module_cls(*args, **kwargs)
    x = _forward_args(sample)[0][0]
    torch.testing.assert_close(ours(x), stock(x))
    _assert_same_state(stock, ours, "after to_empty")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("info", INFOS, ids=lambda i: i.formatted_name)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_cpu_gpu_parity_and_device_transfer(info, training):
    """test_cpu_gpu_parity and test_multiple_device_transfer: the same module on the CPU
    and on the GPU, moved there and back, computes the same outputs and gradients."""
    for sample in _samples(info, torch.float32, training):
        _, cpu = _pair(info, sample, torch.float32, training)
        gpu = copy.deepcopy(cpu).cuda()
        x = _forward_args(sample)[0][0]
        xc = x.detach().clone().requires_grad_(True)
        xg = x.detach().cuda().requires_grad_(True)
        yc, yg = cpu(xc), gpu(xg)
        torch.testing.assert_close(yg.cpu(), yc)
        if yc.numel():
            yc.sum().backward()
            yg.sum().backward()
            torch.testing.assert_close(xg.grad.cpu(), xc.grad)
        _assert_same_state(cpu, gpu.cpu(), sample.desc)
        back = gpu.cpu().cuda().cpu()
        assert type(back) is type(cpu)
