"""Helpers for the PyTorch benchmarks (``bench_torch.py``, ``torch_report.py``).

Two levels, each checked before anything is timed:

* kernels: one BN module, ``numbabn.torch`` against ``torch.nn`` (PyTorch's CPU kernel,
  what ``torch.nn.functional.batch_norm`` runs), train forward, eval forward and
  backward, at ResNet-50's conv2 activation at batch 64 (64, 64, 56, 56) float32, NCHW
  and channels-last, and a dense layer's (64, 256). `kernel_case` builds both modules
  with the same state and `check_kernel_case` compares both with a float64 run;
* whole models written here (no torchvision): the seeds' LeNet (sigmoid, BN after every
  conv and hidden linear layer, 1x32x32 digits-sized inputs) and a ResNet-18-shaped net
  (BasicBlocks, 64-128-256-512), each as ``stock``, ``numbabn``
  (``numbabn.torch.convert`` of a copy) and ``no_bn`` (every BN an ``nn.Identity``: the
  bound). `check_model` compares the stock and numbabn variants with the stock model in
  float64 (eval logits, one training step's loss, gradients and running statistics).

Threads: `use_threads` gives PyTorch the thread count Numba uses (every CPU unless
NUMBA_NUM_THREADS says otherwise), so the two kernels run on equal terms.

asv imports every module here while discovering benchmarks: no ``time_*``/``track_*``
names. PyTorch is imported inside the functions; without it they raise
NotImplementedError (the asv classes then skip).
"""

import copy
import functools
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before Numba/torch load: see _common

import numpy as np  # noqa: E402

from ._common import SMALL_RUN, check_close  # noqa: E402

SEED = 20240601
EPS = 1e-5  # torch.nn's default
MOMENTUM = 0.1

#: name -> (shape, memory format)
KERNEL_CASES = {
    "nchw": ((64, 64, 56, 56), "contiguous"),
    "nhwc": ((64, 64, 56, 56), "channels_last"),
    "nc": ((64, 256), "contiguous"),
}
#: NUMBABN_BENCH_SMALL=1 (every benchmark once, small: see _common) and
#: ``torch_report.py --quick``
SMALL_KERNEL_CASES = {"nchw": ((4, 16, 14, 14), "contiguous"),
                      "nhwc": ((4, 16, 14, 14), "channels_last"),
                      "nc": ((64, 256), "contiguous")}
if SMALL_RUN:
    KERNEL_CASES = SMALL_KERNEL_CASES
KERNEL_OPS = ("train", "inference", "backward")
IMPLS = ("numbabn", "torch")

#: Scaled tolerances of the kernel check (`_common.check_close`: |got - want| <= tol *
#: (1 + |want|)) per implementation: numbabn's float32 outputs are rounded from float64
#: sums (as _common's TOLERANCE); PyTorch's CPU kernel sums in float32 (at (64, 64, 56,
#: 56): dweight off by 2.6e-5 in NCHW, dbias by 2.8e-4 in channels-last), held to 1e-3
#: as a peer (`_common.check_peer`'s tolerance).
KERNEL_TOLERANCE = {"numbabn": 1e-5, "torch": 1e-3}


def torch_or_skip():
    """``(torch, numbabn.torch)``, or NotImplementedError naming why they do not import."""
    try:
        import torch

        import numbabn.torch as nbt
    except ImportError as exc:
        raise NotImplementedError(f"torch / numbabn.torch not importable: {exc}") from None
    return torch, nbt


def use_threads():
    """Give PyTorch Numba's thread count; returns one line saying what runs where."""
    import numba
    import torch

    threads = numba.get_num_threads()
    torch.set_num_threads(threads)
    return (f"torch.set_num_threads({threads}) = Numba's {threads} threads "
            f"({numba.threading_layer() if _numba_started() else 'layer not started'}); "
            f"torch {torch.__version__}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")


def _numba_started():
    import numba

    try:
        numba.threading_layer()
    except ValueError:  # no parallel kernel has run yet
        return False
    return True


# ------------------------------------------------------------------------- kernels

def kernel_case(name, spec=None):
    """Inputs and modules of a kernel case; a dict.

    ``spec``: ``(shape, memory format)``, by default ``KERNEL_CASES[name]``.

    ``x``, ``dy``: seeded standard-normal float32 tensors in the case's memory format;
    ``modules[impl][mode]``: for ``impl`` in `IMPLS` and ``mode`` "train" / "eval", a
    BatchNorm module (``torch.nn`` or ``numbabn.torch``) of that mode, all four with the
    same random weight, bias and running statistics.
    """
    torch, nbt = torch_or_skip()
    shape, fmt = spec or KERNEL_CASES[name]
    gen = torch.Generator().manual_seed(SEED)
    x, dy = (torch.randn(shape, generator=gen) for _ in range(2))
    if fmt == "channels_last":
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    c = shape[1]
    stock = getattr(torch.nn, f"BatchNorm{len(shape) - 2 or 1}d")(c, eps=EPS,
                                                                  momentum=MOMENTUM)
    with torch.no_grad():
        stock.weight.uniform_(0.5, 1.5, generator=gen)
        stock.bias.normal_(0.0, 0.1, generator=gen)
        stock.running_mean.normal_(0.0, 0.1, generator=gen)
        stock.running_var.uniform_(0.5, 1.5, generator=gen)
    modules = {}
    for impl in IMPLS:
        modules[impl] = {}
        for mode in ("train", "eval"):
            m = copy.deepcopy(stock)
            if impl == "numbabn":
                m = nbt.convert(m, to="numbabn")
            modules[impl][mode] = m.train(mode == "train")
    return dict(name=name, x=x, dy=dy, modules=modules, stock=stock)


def kernel_ops(case, impl):
    """``{op: zero-argument callable}`` for `KERNEL_OPS`, on one implementation.

    train: a training-mode forward under ``torch.no_grad()`` (batch statistics and the
    running update, no autograd graph); inference: an eval-mode forward, no_grad;
    backward: ``torch.autograd.grad`` of one training-mode forward, to x, weight and
    bias (the graph kept, so every call runs the backward alone). Outputs are
    allocated by each call, by both implementations.
    """
    import torch

    x, dy, modules = case["x"], case["dy"], case["modules"][impl]
    train_m, eval_m = modules["train"], modules["eval"]
    x_req = x.detach().requires_grad_(True)
    y = train_m(x_req)
    inputs = (x_req, train_m.weight, train_m.bias)

    def train():
        with torch.no_grad():
            return train_m(x)

    def inference():
        with torch.no_grad():
            return eval_m(x)

    def backward():
        return torch.autograd.grad(y, inputs, dy, retain_graph=True)

    return {"train": train, "inference": inference, "backward": backward}


def check_kernel_case(case):
    """Run both implementations once on fresh copies of the case's state, compare each
    with torch's float64 kernel; raise AssertionError on a mismatch (nothing is timed
    then). Returns ``{impl: largest scaled error}``.

    Compared: train output, running mean and variance after that step, eval output,
    dx, dweight, dbias, each to its `KERNEL_TOLERANCE`.
    """
    import torch

    x, dy, stock = case["x"], case["dy"], case["stock"]

    def run(module, x, dy):
        m = copy.deepcopy(module).train()
        x = x.detach().requires_grad_(True)
        y = m(x)
        grads = torch.autograd.grad(y, (x, m.weight, m.bias), dy)
        with torch.no_grad():
            y_eval = copy.deepcopy(module).eval()(x)
        return dict(y_train=y, running_mean=m.running_mean, running_var=m.running_var,
                    y_eval=y_eval, dx=grads[0], dweight=grads[1], dbias=grads[2])

    want = run(copy.deepcopy(stock).double(), x.double(), dy.double())
    want = {k: v.detach().numpy() for k, v in want.items()}
    worst = {}
    for impl in IMPLS:
        module = case["modules"][impl]["train"]
        # the case's modules may have been run (and timed) already: start from `stock`
        fresh = copy.deepcopy(module)
        fresh.load_state_dict(stock.state_dict())
        got = run(fresh, x, dy)
        worst[impl] = 0.0
        for k, v in got.items():
            v = v.detach().numpy()
            check_close(f"{case['name']} {impl} {k}", v, want[k], KERNEL_TOLERANCE[impl])
            err = np.abs(v - want[k]) / (1.0 + np.abs(want[k]))
            worst[impl] = max(worst[impl], float(err.max(initial=0.0)))
    return worst


def torch_copy_bandwidth(x, repeat=10):
    """Bytes/s of ``Tensor.copy_`` into a tensor like ``x`` (2 x nbytes per copy)."""
    import torch

    from ._common import best_of

    dst = torch.empty_like(x)
    return 2 * x.numel() * x.element_size() / best_of(lambda: dst.copy_(x), repeat)


# -------------------------------------------------------------------------- models

#: The whole-model configurations: LeNet at the digits demo's size (1x32x32, batch
#: 128), ResNet-18's shape on 3x64x64 inputs at batch 32 (~0.3 s a training step on 2
#: cores). Small runs: narrower ResNet, tiny batches.
MODELS = {
    "lenet": dict(channels=1, size=32, batch=128, classes=10),
    "resnet18": dict(channels=3, size=64, batch=32, classes=10,
                     widths=(64, 128, 256, 512)),
}
SMALL_MODELS = {
    "lenet": dict(channels=1, size=32, batch=4, classes=10),
    "resnet18": dict(channels=3, size=32, batch=2, classes=10, widths=(8, 8, 16, 16)),
}
if SMALL_RUN:
    MODELS = SMALL_MODELS
MODEL_VARIANTS = ("stock", "numbabn", "no_bn")
MODEL_MODES = ("train", "inference")
LEARNING_RATE = 0.01

#: Tolerances of `check_model`, relative to float64 (see there). Measured at full size,
#: stock and numbabn alike: logits 1.1e-6 (LeNet), 4.0e-6 (ResNet-18); loss <= 2.4e-7;
#: running statistics <= 8.4e-8; gradients 4e-6 (LeNet) and 0.015 (ResNet-18: the
#: backward through 20 float32 conv layers at random initialisation amplifies rounding,
#: as _model_common found for Keras's ResNet50). A wrong BN formula (a missing term of the
#: backward, a wrong momentum, moving statistics where batch ones belong) is off by far more.
MODEL_TOLERANCE = {"logits": 1e-4, "loss": 1e-5, "gradients": 0.1, "running": 1e-5}


def lenet(channels=1, size=32, classes=10, **_):
    """The seeds' LeNet: conv-BN-sigmoid-pool twice, then linear-BN-sigmoid twice."""
    from torch import nn

    side = ((size - 4) // 2 - 4) // 2  # two unpadded 5x5 convolutions, each pooled 2x2
    return nn.Sequential(
        nn.Conv2d(channels, 6, 5), nn.BatchNorm2d(6), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16), nn.Sigmoid(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * side * side, 120), nn.BatchNorm1d(120), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84), nn.Sigmoid(),
        nn.Linear(84, classes),
    )


def resnet18(channels=3, classes=10, widths=(64, 128, 256, 512), **_):
    """ResNet-18's shape: a 7x7/2 stem and max-pool, four stages of two BasicBlocks
    (3x3 conv-BN-ReLU-3x3 conv-BN, plus the identity or a 1x1/2 conv-BN shortcut), global
    average pooling, a linear classifier. 20 BN layers."""
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = nn.Sequential()
            if stride != 1 or cin != cout:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                              nn.BatchNorm2d(cout))

        def forward(self, x):
            h = self.relu(self.bn1(self.conv1(x)))
            return self.relu(self.bn2(self.conv2(h)) + self.shortcut(x))

    layers = [nn.Conv2d(channels, widths[0], 7, 2, 3, bias=False), nn.BatchNorm2d(widths[0]),
              nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = widths[0]
    for i, w in enumerate(widths):
        layers += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def bn_modules(model):
    from torch import nn

    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def model_data(name, cfg=None):
    """Seeded (x, labels) of a model's configuration (by default ``MODELS[name]``)."""
    import torch

    cfg = cfg or MODELS[name]
    gen = torch.Generator().manual_seed(SEED + 1)
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["size"], cfg["size"], generator=gen)
    return x, torch.randint(0, cfg["classes"], (cfg["batch"],), generator=gen)


def build_stock(name, cfg=None):
    """The stock model, seeded, with non-trivial BN state: random weight and bias, and
    running statistics set to a calibration batch's (one training-mode forward with
    momentum 1), so that eval-mode BN is no near-identity that hides a wrong formula."""
    import torch

    torch.manual_seed(SEED)
    cfg = cfg or MODELS[name]
    model = {"lenet": lenet, "resnet18": resnet18}[name](**cfg)
    gen = torch.Generator().manual_seed(SEED)
    bns = bn_modules(model)
    with torch.no_grad():
        for bn in bns:
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.normal_(0.0, 0.1, generator=gen)
            bn.momentum = 1.0
        model.train()(torch.randn(cfg["batch"], cfg["channels"], cfg["size"], cfg["size"],
                                  generator=gen))
        for bn in bns:
            bn.momentum = MOMENTUM
            bn.num_batches_tracked.zero_()
    return model


def _without_bn(model):
    from torch import nn

    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            model.add_module(name, nn.Identity())
        else:
            _without_bn(child)
    return model


def build_model_variants(name, cfg=None):
    """``{variant: model}`` for `MODEL_VARIANTS`, separate copies with the same weights."""
    _, nbt = torch_or_skip()
    stock = build_stock(name, cfg)
    return {"stock": stock,
            "numbabn": nbt.convert(copy.deepcopy(stock), to="numbabn"),
            "no_bn": _without_bn(copy.deepcopy(stock))}


def _step(model, x, y, dtype):
    """Eval logits, then one training step's loss, gradients (flat) and the first BN's
    running statistics after it, on a copy of ``model`` in ``dtype``."""
    import torch

    model = copy.deepcopy(model).to(dtype)
    x = x.to(dtype)
    with torch.no_grad():
        logits = model.eval()(x)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    bn = bn_modules(model)[0]
    running = torch.cat([bn.running_mean, bn.running_var])
    return {k: v.detach().double() for k, v in dict(
        logits=logits, loss=loss, gradients=grads, running=running).items()}


def check_model(variants, x, y, tol=None):
    """Compare stock and numbabn with the stock model in float64; raise AssertionError
    if either is off by more than `MODEL_TOLERANCE` (nothing is timed then).

    Returns ``{quantity: {variant: relative error}}``: ``logits`` (eval mode, running
    statistics) max |got - want| / max |want|; ``loss`` of one training step (batch
    statistics); ``gradients``, all parameters together, ||got - want|| / ||want|| (per
    tensor it would mean nothing for the conv biases before a BN: exactly zero, noise in
    both); ``running``: the first BN's running mean and variance after that step.
    float64 is the judge, not the stock model: stock's float32 statistics and gradient
    sums are the less accurate of the two (see the report's errors).
    """
    import torch

    tol = {**MODEL_TOLERANCE, **(tol or {})}
    want = _step(variants["stock"], x, y, torch.float64)
    errors, failures = {}, []
    for variant in ("stock", "numbabn"):
        got = _step(variants[variant], x, y, torch.float32)
        for k, v in got.items():
            if k == "gradients":
                err = float((v - want[k]).norm() / want[k].norm())
            else:
                err = float((v - want[k]).abs().max() / want[k].abs().max())
            errors.setdefault(k, {})[variant] = err
            if not err <= tol[k]:
                failures.append(f"{variant} {k} relative error {err:.3g} > {tol[k]:.1g}")
    if failures:
        raise AssertionError("a model variant disagrees with float64 (nothing was "
                             "timed):\n  " + "\n  ".join(failures))
    return errors


def model_step_fns(variants, x, y):
    """``{(variant, mode): fn}``: one SGD training step (zero_grad, forward, cross
    entropy, backward, step) / one eval-mode forward under no_grad, per variant."""
    import torch

    fns = {}
    for k, model in variants.items():
        opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)

        def train(model=model, opt=opt):
            model.train()
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()

        def inference(model=model):
            model.eval()
            with torch.no_grad():
                return model(x)

        fns[(k, "train")], fns[(k, "inference")] = train, inference
    return fns


def measure_torch_model(name, rounds=7, min_block=0.5, cfg=None, timed=None, bn_rounds=0):
    """Build, check and time one model's variants; a plain (picklable) dict.

    ``cfg``: the model's configuration, by default ``MODELS[name]``.

    ``ms[mode][variant]``: median ms per step over ``rounds`` interleaved rounds
    (`_model_common.interleaved_medians`), ``spread`` and ``paired`` as
    `_model_common.summarize_rounds` gives them; ``errors`` from `check_model`; ``bn_layers``;
    ``seconds`` (build + check, timing) of wall time. ``timed``: the variants timed
    (every one by default; all are checked). ``bn_rounds`` > 0 adds ``bn_ms[mode][variant]``
    for stock and numbabn: `bn_step_ms` with that many rounds (profiled after the timing).
    """
    from ._model_common import interleaved_medians, summarize_rounds

    cfg = cfg or MODELS[name]
    t0 = time.perf_counter()
    variants = build_model_variants(name, cfg)
    x, y = model_data(name, cfg)
    errors = check_model(variants, x, y)
    if timed is not None:
        variants = {k: v for k, v in variants.items() if k in timed}
    t1 = time.perf_counter()
    fns = model_step_fns(variants, x, y)
    median, samples = interleaved_medians(fns, rounds, min_block)
    bn_ms = {mode: {v: bn_step_ms(fns[(v, mode)], rounds=bn_rounds)
                    for v in ("stock", "numbabn") if v in variants}
             for mode in MODEL_MODES} if bn_rounds else {}
    t2 = time.perf_counter()
    return dict(model=name, **summarize_rounds(median, samples, variants, MODEL_MODES),
                bn_ms=bn_ms, errors=errors, config=cfg,
                rounds=rounds, bn_layers=len(bn_modules(variants["stock"])),
                seconds=dict(check=t1 - t0, timing=t2 - t1))


@functools.lru_cache(maxsize=None)
def _is_bn_event(name):
    """Whether a profiler event is one BN layer's work, whole: stock's forward
    (``aten::batch_norm``) and backward node, numbabn's op (``numbabn_native::``) and its
    C++ backward node (``...NumbabnTrainFunction>``), or the Python path's Functions."""
    from numbabn.torch import _ops

    if name.startswith("autograd::engine::evaluate_function: "):
        name = name.split(": ", 1)[1]
    functions = [f.__name__ for f in (_ops._Train, _ops._Inference)]
    return (name in ("aten::batch_norm", "NativeBatchNormBackward0", *functions,
                     *(f + "Backward" for f in functions))
            or name.startswith(("numbabn_native::", "numbabn::")) or "Numbabn" in name)


def bn_step_ms(fn, steps=10, rounds=3):
    """Milliseconds per call of ``fn`` (a model step) spent in its BN layers, from
    ``torch.profiler``: the wall time of every outermost BN event (`_is_bn_event`;
    children included, so the op's allocations count), summed; the median of ``rounds``
    profiles of ``steps`` calls. What the whole-step time cannot show when BN is a few
    percent of a step that moves 20-40 % between rounds. Python around the op (the
    module's own ``forward``) is not in it, for either library."""
    from torch.profiler import ProfilerActivity, profile

    per_round = []
    for _ in range(rounds):
        fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                fn()
        per_round.append(_bn_event_us(prof.events()) / 1e3 / steps)
    return sorted(per_round)[len(per_round) // 2]


def _bn_event_us(events):
    """Microseconds of the outermost BN events (`_is_bn_event`) among profiler
    ``events`` (``name``, ``cpu_parent``, ``cpu_time_total``): a BN event inside another
    one (the Python path's Function calling numbabn's custom op) is in its parent's time
    already."""
    total = 0.0
    for event in events:
        if not _is_bn_event(event.name):
            continue
        parent = event.cpu_parent
        while parent is not None and not _is_bn_event(parent.name):
            parent = parent.cpu_parent
        if parent is None:
            total += event.cpu_time_total
    return total


def bn_cost_ratio(ms, mode):
    """numbabn's BN cost over stock's, each the variant's time minus no_bn's (NaN when
    stock's BN cost is not positive: noise on a tiny model)."""
    t = ms[mode]
    stock = t["stock"] - t["no_bn"]
    return (t["numbabn"] - t["no_bn"]) / stock if stock > 0 else float("nan")
