"""asv benchmarks of ``numbabn.torch`` against PyTorch's own batch norm on the CPU.

* `TorchKernels`: one BN module, numbabn's or ``torch.nn``'s (PyTorch's CPU kernel),
  train forward, eval forward and backward (ms per call, the two timed in turns), at (64, 64, 56, 56) float32 NCHW and
  channels-last and (64, 256) (`_torch_common.KERNEL_CASES`).
* `TorchModels`: whole models written in ``_torch_common`` (the seeds' LeNet, a
  ResNet-18-shaped net): one SGD training step and one eval forward, stock ``torch.nn``
  BN vs ``numbabn.torch.convert`` vs BN removed (the bound).

Both run on the same thread count (`_torch_common.use_threads`: PyTorch gets Numba's),
and both check before timing, in ``setup_cache``: `TorchKernels`' runs both
implementations on every case against torch's float64 kernel (a wrong result fails the
class's benchmarks instead of being timed), `TorchModels`' checks the variants against
the stock model in float64; each then times its implementations or variants in turns in
that one process, and each ``track_`` returns a figure of that measurement (why: see
``bench_models.py``).

Without PyTorch every ``setup`` raises NotImplementedError: asv skips the classes.
"""

import os

# Before Numba or PyTorch load (see _common): spinning OpenMP threads left by one
# library's kernel slow the other library's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ._common import (  # noqa: E402
    ASV_SETTINGS, SMALL_RUN, best_of_interleaved, preimport_frameworks,
)
from ._torch_common import (  # noqa: E402
    IMPLS, KERNEL_CASES, KERNEL_OPS, MODELS, bn_cost_ratio, check_kernel_case,
    kernel_case, kernel_ops, measure_torch_model, torch_or_skip, use_threads,
)

preimport_frameworks()  # once, in asv's forkserver (see _common)
rounds, repeat, warmup_time = (ASV_SETTINGS[k] for k in ("rounds", "repeat", "warmup_time"))


#: best of this many runs of each implementation, in turns (each run >= 20 ms of calls)
TORCH_REPEAT = 1 if SMALL_RUN else 5


def measure_torch_kernels():
    """Check both implementations on every kernel case, then time them in turns
    (``setup_cache`` of `TorchKernels`).

    Returns ``{"ms": {case: {op: {impl: ms per call}}}}``, or ``{"skip": why}`` without
    PyTorch. Raises AssertionError (nothing timed) if either is wrong.
    """
    try:
        torch_or_skip()
    except NotImplementedError as exc:
        return {"skip": str(exc)}
    use_threads()
    ms = {}
    for name in KERNEL_CASES:
        case = kernel_case(name)
        check_kernel_case(case)
        ops = {impl: kernel_ops(case, impl) for impl in IMPLS}
        ms[name] = {op: {impl: 1e3 * t for impl, t in best_of_interleaved(
            {impl: ops[impl][op] for impl in IMPLS}, TORCH_REPEAT).items()}
            for op in KERNEL_OPS}
    return {"ms": ms}


measure_torch_kernels.timeout = 600


class TorchKernels:
    """ms per call of one BN module, numbabn's or PyTorch's, at the same thread count:
    the two timed in turns in ``setup_cache`` (best of `TORCH_REPEAT` runs each), after
    both were checked against float64; each ``track_`` returns one figure of that.
    (One process for all: building the modules and 51 MB inputs, and loading numbabn's
    kernels, took ~3 s in each of 18 asv processes.)"""

    params = [list(KERNEL_CASES), list(IMPLS)]
    param_names = ["case", "impl"]
    timeout = 300

    setup_cache = staticmethod(measure_torch_kernels)

    def setup(self, results, case, impl):
        if "skip" in results:
            raise NotImplementedError(results["skip"])
        self.ms = {op: results["ms"][case][op][impl] for op in KERNEL_OPS}
        self.torch_ms = {op: results["ms"][case][op]["torch"] for op in KERNEL_OPS}

    def track_ms_train(self, results, case, impl):
        """Training-mode forward under no_grad (batch statistics, running update)."""
        return self.ms["train"]

    def track_ms_inference(self, results, case, impl):
        return self.ms["inference"]

    def track_ms_backward(self, results, case, impl):
        """autograd backward of one training-mode forward, to x, weight and bias."""
        return self.ms["backward"]

    def track_time_over_torch_train(self, results, case, impl):
        """This implementation's time over ``torch.nn``'s from the same turns (1.0 for
        torch itself; below 1, numbabn is faster): a ratio that holds under load."""
        return self.ms["train"] / self.torch_ms["train"]

    def track_time_over_torch_inference(self, results, case, impl):
        return self.ms["inference"] / self.torch_ms["inference"]

    def track_time_over_torch_backward(self, results, case, impl):
        return self.ms["backward"] / self.torch_ms["backward"]

    track_ms_train.unit = "ms"
    track_ms_inference.unit = "ms"
    track_ms_backward.unit = "ms"
    track_time_over_torch_train.unit = "x"
    track_time_over_torch_inference.unit = "x"
    track_time_over_torch_backward.unit = "x"


#: the models' timing: 3 rounds of >= 0.3 s blocks (1 round of single steps when small)
ROUNDS, MIN_BLOCK = (1, 0.0) if SMALL_RUN else (3, 0.3)
#: the variants timed per commit: stock and numbabn (all three are checked); the bound
#: (BN removed, for the BN cost ratio) too with NUMBABN_BENCH_FULL=1 (or when small)
FULL_RUN = os.environ.get("NUMBABN_BENCH_FULL") == "1"
TIMED_VARIANTS = ("stock", "numbabn", "no_bn") if FULL_RUN or SMALL_RUN else (
    "stock", "numbabn")


def measure_torch_models():
    """``{model: _torch_common.measure_torch_model(model)}`` (setup_cache), or
    ``{"skip": why}`` without PyTorch. Raises AssertionError if a variant is wrong."""
    try:
        torch_or_skip()
    except NotImplementedError as exc:
        return {"skip": str(exc)}
    use_threads()
    return {name: measure_torch_model(name, rounds=ROUNDS, min_block=MIN_BLOCK,
                                      timed=TIMED_VARIANTS)
            for name in MODELS}


# ~15 s to build and check (ResNet-18 in float64 dominates), ~20 s of timing, 2 cores
measure_torch_models.timeout = 600


class TorchModels:
    """ms per step of whole PyTorch models, stock BN vs numbabn vs none, measured in
    turns in one process (see the module docstring)."""

    params = [list(MODELS)]
    param_names = ["model"]
    timeout = 600

    setup_cache = staticmethod(measure_torch_models)

    def setup(self, results, model):
        if "skip" in results:
            raise NotImplementedError(results["skip"])
        self.ms = results[model]["ms"]

    def track_ms_train_stock(self, results, model):
        return self.ms["train"]["stock"]

    def track_ms_train_numbabn(self, results, model):
        return self.ms["train"]["numbabn"]

    def track_ms_inference_stock(self, results, model):
        return self.ms["inference"]["stock"]

    def track_ms_inference_numbabn(self, results, model):
        return self.ms["inference"]["numbabn"]

    def track_speedup_vs_stock_train(self, results, model):
        """stock ms / numbabn ms (above 1: numbabn's model is faster)."""
        return self.ms["train"]["stock"] / self.ms["train"]["numbabn"]

    def track_speedup_vs_stock_inference(self, results, model):
        return self.ms["inference"]["stock"] / self.ms["inference"]["numbabn"]

    track_ms_train_stock.unit = "ms"
    track_ms_train_numbabn.unit = "ms"
    track_ms_inference_stock.unit = "ms"
    track_ms_inference_numbabn.unit = "ms"
    track_speedup_vs_stock_train.unit = "x"
    track_speedup_vs_stock_inference.unit = "x"


def _bound_figures():
    """`TorchModels`' figures of the no-BN bound, when it is timed."""

    def track_ms_train_no_bn(self, results, model):
        return self.ms["train"]["no_bn"]

    def track_ms_inference_no_bn(self, results, model):
        return self.ms["inference"]["no_bn"]

    def track_bn_cost_ratio_vs_stock_train(self, results, model):
        """(numbabn - no_bn) / (stock - no_bn); NaN if stock - no_bn <= 0 (noise)."""
        return bn_cost_ratio(self.ms, "train")

    def track_bn_cost_ratio_vs_stock_inference(self, results, model):
        return bn_cost_ratio(self.ms, "inference")

    for fn, unit in ((track_ms_train_no_bn, "ms"), (track_ms_inference_no_bn, "ms"),
                     (track_bn_cost_ratio_vs_stock_train, "x"),
                     (track_bn_cost_ratio_vs_stock_inference, "x")):
        fn.unit = unit
        setattr(TorchModels, fn.__name__, fn)


if "no_bn" in TIMED_VARIANTS:
    _bound_figures()
