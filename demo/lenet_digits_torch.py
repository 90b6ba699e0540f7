"""LeNet with batch normalization, trained in PyTorch twice: stock BN modules, then numbabn's.

The seeds' PyTorch LeNet (d2l style): a BatchNorm after every convolution and hidden
linear layer, sigmoid activations (BN is what lets sigmoids train fast here):

    Conv2d(1, 6, 5) BatchNorm2d Sigmoid MaxPool2d(2) | Conv2d(6, 16, 5) BatchNorm2d
    Sigmoid MaxPool2d(2) | Flatten | Linear(400, 120) BatchNorm1d Sigmoid |
    Linear(120, 84) BatchNorm1d Sigmoid | Linear(84, 10)

It learns scikit-learn's bundled 8x8 digits (no download). As in the Keras demo
(``demo/lenet_digits.py``, same split, batch, epochs and optimizer), each image is
upsampled 4x to 32x32, so the unpadded 5x5 convolutions give LeNet-5's textbook
6x28x28 -> 6x14x14 -> 16x10x10 -> 16x5x5 feature maps (the seed's 16*4*4 was for 28x28
MNIST) and nearest-neighbour repetition invents no pixel values.

What the seed got wrong, and this does not copy: its hand-written BN (beta initialised
to ones for convolutions, the momentum weighing the *new* value by 0.9, a running
variance from zeros and biased), the accuracy divided by batches x batch size (wrong
for a partial last batch), and ``.cuda()`` everywhere. Here the stock model uses
``torch.nn.BatchNorm1d/2d``, and ``numbabn.torch.convert(copy.deepcopy(model))`` gives the
same model with numbabn's modules and identical weights (convert swaps modules in place).
Before training, one training step of each on the same batch is checked against the
stock model in float64 (logits, loss, gradients). Both are trained the same way with the
same seed (so the same batch order), in turns, epoch by epoch; the final table shows
test accuracy and time per epoch, then one training step of the BN layers alone
(forward + backward at the shapes they see in this network), stock vs numbabn.

Test accuracies can differ by a few images though the losses agree to 4 digits: the
conv biases before a BN have an exact gradient of zero, and Adam turns their
rounding-level gradients into full-size steps; with stock's float32 gradient sums 1e-3
off float64 (numbabn's: 3e-6, printed first), the runs drift ~1 % apart in some weights
by the tenth epoch, and the test images they classify differently are near-ties.

Threads: PyTorch and Numba are both set to the same count, ``--threads`` (default: every
CPU, ``os.cpu_count()``), printed first. Run it: ``make demo-torch``, or
``python demo/lenet_digits_torch.py`` where numbabn[torch] and scikit-learn are
installed. About 30 s on 2 CPU cores. The first numbabn call (the check before
training) also compiles numbabn's kernels on a first run (cached on disk after) and
imports ``torch._dynamo`` (~5 s here: PyTorch's custom operators load it on first use).
"""

import argparse
import copy
import os

# Before PyTorch or Numba load: idle OpenMP threads that spin steal the cores the other
# library needs next (PyTorch's and Numba's pools take turns on the same cores here).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import time  # noqa: E402
import timeit  # noqa: E402

import numba  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from torch import nn  # noqa: E402

import numbabn.torch as nbt  # noqa: E402

SEED, EPOCHS, BATCH, LEARNING_RATE = 0, 10, 128, 1e-3
# PyTorch's momentum weighs the new batch: 0.2 here is the Keras demo's 0.8. The
# default, 0.1, leaves the running statistics (what test-time inference uses) behind
# the batch statistics after only ~110 steps.
BN_MOMENTUM = 0.2


def load_data():
    """The Keras demo's split, as NCHW float32 tensors: (N, 1, 32, 32) images, labels."""
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)           # (1797, 8, 8), in [0, 1]
    x = x.repeat(4, axis=1).repeat(4, axis=2)[:, None]      # (1797, 1, 32, 32)
    parts = train_test_split(x, digits.target, test_size=0.25, random_state=SEED,
                             stratify=digits.target)
    x_train, x_test, y_train, y_test = (torch.from_numpy(np.ascontiguousarray(p))
                                        for p in parts)
    return x_train, x_test, y_train.long(), y_test.long()


def lenet_bn():
    return nn.Sequential(
        nn.Conv2d(1, 6, 5), nn.BatchNorm2d(6, momentum=BN_MOMENTUM), nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(6, 16, 5), nn.BatchNorm2d(16, momentum=BN_MOMENTUM), nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120), nn.BatchNorm1d(120, momentum=BN_MOMENTUM), nn.Sigmoid(),
        nn.Linear(120, 84), nn.BatchNorm1d(84, momentum=BN_MOMENTUM), nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def check_same_step(stock, ours, x, y):
    """One training-mode forward and backward of each model on the same batch, against
    the stock model in float64; raise AssertionError if either is off by more than
    float32 rounding allows.

    Works on copies, so no model's running statistics move. Returns
    ``{model: {"logits": ..., "loss": ..., "gradients": ...}}``, relative differences
    from float64: max |got - want| over max |want| for the logits and the loss; for the
    gradients, the L2 norm of the difference over the float64 gradients' norm, all
    parameters together. (Per tensor it would mean nothing for the biases of the layers
    before a BN: their exact gradient is zero, so every model gives rounding noise.)
    float64 is the judge, not the stock model: stock's float32 gradients are the
    further off of the two here (see the printout).
    """
    def step(model, dtype):
        model = copy.deepcopy(model).to(dtype)
        model.train()
        logits = model(x.to(dtype))
        loss = nn.functional.cross_entropy(logits, y)
        loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        return {k: v.detach().double() for k, v in
                dict(logits=logits, loss=loss, gradients=grads).items()}

    want = step(stock, torch.float64)
    errors = {}
    for name, model in (("stock", stock), ("numbabn", ours)):
        got = step(model, torch.float32)
        errors[name] = {k: float((got[k] - want[k]).abs().max() / want[k].abs().max())
                        for k in ("logits", "loss")}
        errors[name]["gradients"] = float((got["gradients"] - want["gradients"]).norm()
                                          / want["gradients"].norm())
    # Measured: logits and loss 1e-7 (numbabn) to 3e-5 (stock), gradients 1e-6 to 1e-3
    # (stock: its
    # float32 sums over the first BN's 100 k elements per channel). A wrong formula
    # (the unbiased variance in the normalization, a missing term of the backward) is
    # off by ~1e-2 or more.
    limits = {"logits": 1e-4, "loss": 1e-4, "gradients": 1e-2}
    bad = [f"{name} {k} {e:.2g}" for name, by in errors.items() for k, e in by.items()
           if not e <= limits[k]]
    if bad:
        raise AssertionError("a model disagrees with float64 before training (relative "
                             f"differences; limits {limits}): {', '.join(bad)}")
    return errors


def fit(models, data):
    """Train every model with Adam, epoch by epoch in turns; returns ``{name: (test
    accuracy, seconds of each epoch, test predictions)}``.

    Each model shuffles with its own generator, seeded alike, so all see the same batches
    in the same order. Taking turns by epoch (the order alternating) lets a change of
    load on a shared machine hit every model alike.
    """
    x_train, x_test, y_train, y_test = data
    gens = {name: torch.Generator().manual_seed(SEED) for name in models}
    optimizers = {name: torch.optim.Adam(m.parameters(), lr=LEARNING_RATE)
                  for name, m in models.items()}
    seconds = {name: [] for name in models}
    for epoch in range(EPOCHS):
        names = list(models)[::1 if epoch % 2 == 0 else -1]
        losses = {}
        for name in names:
            model, optimizer = models[name], optimizers[name]
            start = time.perf_counter()
            model.train()
            order = torch.randperm(len(x_train), generator=gens[name])
            loss_sum = 0.0
            for i in range(0, len(order), BATCH):
                idx = order[i:i + BATCH]
                loss = nn.functional.cross_entropy(model(x_train[idx]), y_train[idx])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                loss_sum += loss.item() * len(idx)
            seconds[name].append(time.perf_counter() - start)
            losses[name] = loss_sum / len(x_train)
        print(f"epoch {epoch + 1:2d}: " + ", ".join(
            f"{name} loss {losses[name]:.4f} in {seconds[name][-1]:.2f} s" for name in models))
    results = {}
    for name, model in models.items():
        model.eval()
        with torch.no_grad():
            predicted = model(x_test).argmax(dim=1)
        results[name] = (float((predicted == y_test).float().mean()), seconds[name],
                         predicted)
    return results


def bn_shapes(model, batch):
    """The input shape of each BN module, at this batch size (recorded by forward hooks)."""
    shapes = []
    hooks = [m.register_forward_hook(lambda m, inp, out: shapes.append(tuple(inp[0].shape)))
             for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()  # no running-statistics update
    with torch.no_grad():
        model(torch.zeros(batch, 1, 32, 32))
    for hook in hooks:
        hook.remove()
    return shapes


def bn_step(bn_class, shapes):
    """One training step of BN modules alone, one module per shape: forward with batch
    statistics and running update, backward to x, weight and bias."""
    gen = torch.Generator().manual_seed(SEED)
    xs = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    dys = [torch.randn(s, generator=gen) for s in shapes]
    bns = [bn_class(s[1], momentum=BN_MOMENTUM) for s in shapes]

    def step():
        ys = [bn(x) for bn, x in zip(bns, xs)]
        torch.autograd.backward(ys, dys)

    return step


def best_of(fns, repeat=30):
    """Fastest of ``repeat`` timings of each zero-argument function, in seconds per call.

    The functions take turns, so a load change on the machine hits them all alike."""
    timers = {name: timeit.Timer(fn) for name, fn in fns.items()}
    numbers = {}
    for name, timer in timers.items():
        timer.timeit(1)  # compile numbabn's kernels for this shape
        numbers[name] = max(1, int(0.02 / timer.timeit(1)))  # ~20 ms per timing
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, timer in timers.items():
            best[name] = min(best[name], timer.timeit(numbers[name]) / numbers[name])
    return best


def bn_steps(kind, shapes):
    """`bn_step` for each shape, with the BatchNorm1d/2d class its rank calls for,
    stock (``torch.nn``) or ours (``numbabn.torch``), run one after the other."""
    module = nn if kind == "stock" else nbt
    fns = [bn_step(getattr(module, f"BatchNorm{len(s) - 2 or 1}d"), [s]) for s in shapes]

    def step():
        for fn in fns:
            fn()

    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for PyTorch and for Numba (default: os.cpu_count())")
    args = parser.parse_args(argv)
    # The same thread count for both libraries, or the comparison is of thread counts.
    threads = min(args.threads, numba.config.NUMBA_NUM_THREADS)
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    print(f"threads: torch.set_num_threads({threads}), numba.set_num_threads({threads}); "
          f"torch {torch.__version__}, numba {numba.__version__}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")

    data = load_data()
    print(f"digits: {len(data[0])} train / {len(data[1])} test images, upsampled to "
          f"32x32; batch {BATCH}, {EPOCHS} epochs, Adam lr {LEARNING_RATE}, BN momentum "
          f"{BN_MOMENTUM}")

    torch.manual_seed(SEED)
    stock = lenet_bn()
    # convert() swaps the BN modules in place, keeping their tensors (as
    # SyncBatchNorm.convert_sync_batchnorm does): convert a copy, to keep both models
    ours = nbt.convert(copy.deepcopy(stock), to="numbabn")
    stock_state, our_state = stock.state_dict(), ours.state_dict()
    assert stock_state.keys() == our_state.keys()
    assert all(torch.equal(stock_state[k], our_state[k]) for k in stock_state)
    errors = check_same_step(stock, ours, data[0][:BATCH], data[2][:BATCH])
    print("one training step on the same batch, relative difference from float64:")
    for name, by in errors.items():
        print(f"  {name:8} " + ", ".join(f"{k} {e:.1e}" for k, e in by.items()))

    print("\nstock: LeNet with torch.nn.BatchNorm1d/2d; numbabn: with "
          "numbabn.torch.BatchNorm1d/2d; trained in turns, epoch by epoch")
    results = fit({"stock": stock, "numbabn": ours}, data)
    agree = float((results["stock"][2] == results["numbabn"][2]).float().mean())

    shapes = bn_shapes(stock, BATCH)
    cases = {str(shape): [shape] for shape in shapes}
    cases["all 4, one step"] = shapes
    steps = {(kind, case): bn_steps(kind, case_shapes)
             for case, case_shapes in cases.items() for kind in ("stock", "numbabn")}
    seconds = best_of(steps)

    print(f"\n{'':36}{'stock':>10}{'numbabn':>10}")
    rows = [("test accuracy", lambda n: f"{results[n][0]:.2%}"),
            ("first epoch, with JIT (s)", lambda n: f"{results[n][1][0]:.2f}"),
            (f"epochs 2-{EPOCHS}, median per epoch (ms)",
             lambda n: f"{1e3 * np.median(results[n][1][1:]):.0f}")]
    for label, cell in rows:
        print(f"{label:36}{cell('stock'):>10}{cell('numbabn'):>10}")
    print(f"the two trained models predict the same digit for {agree:.1%} of test images")
    print(f"\nBN modules alone: one training step (forward + running update + backward, "
          f"best of 30), ms,\nat the input shapes they see in this network "
          f"({threads} threads each):")
    print(f"  {'BN input':34}{'stock':>10}{'numbabn':>10}{'speed-up':>10}")
    for case in cases:
        stock_s, ours_s = seconds[("stock", case)], seconds[("numbabn", case)]
        print(f"  {case:34}{1e3 * stock_s:>10.3f}{1e3 * ours_s:>10.3f}"
              f"{stock_s / ours_s:>9.2f}x")
    print("benchmarks/torch_report.py times the kernels at large sizes and whole models.")


if __name__ == "__main__":
    main()
