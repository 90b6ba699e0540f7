"""Print a Markdown report: numbabn.torch against PyTorch's own batch norm on the CPU.

Usage (from the repository root; ``make bench`` runs it)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/torch_report.py [--repeat N] [--rounds R]
        [--quick]

Kernels: one BN module, ``numbabn.torch.BatchNorm*d`` vs ``torch.nn.BatchNorm*d`` (what
``torch.nn.functional.batch_norm`` runs: PyTorch's CPU kernel), train forward, eval
forward and backward at (64, 64, 56, 56) float32 NCHW and channels-last and (64, 256),
both checked against torch's float64 kernel first, then timed in turns (best of N, 10 by
default), beside the copy bandwidth measured in the same run and the floor it implies.
Whole models (written in ``_torch_common``, no torchvision): the seeds' LeNet and a
ResNet-18-shaped network, stock vs ``numbabn.torch.convert`` vs BN removed, checked
against the stock model in float64, then a training step and an eval forward timed in
turns, R rounds (7 by default), medians. PyTorch gets Numba's thread count. ``--quick``:
small inputs, few repeats (a smoke run). The asv suite ``bench_torch.py`` uses the
same helpers.
"""

import argparse
import datetime
import os
import platform
import sys
import time

# Before Numba or PyTorch load: spinning OpenMP threads left by one library's kernel
# slow the other's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# torch.profiler (`_torch_common.bn_step_ms`) logs "USDT: ... profiler_start/stop" on
# stderr for every profile; kineto's top level (USDT is 5) silences it
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

if __package__:  # imported by asv's benchmark discovery, as benchmarks.torch_report
    from ._common import (BYTES_MOVED, best_of_interleaved, copy_bandwidth,
                          floor_seconds, markdown_table)
    from ._torch_common import (
        IMPLS, KERNEL_CASES, KERNEL_OPS, KERNEL_TOLERANCE, MODEL_MODES, MODEL_TOLERANCE,
        MODELS, SMALL_KERNEL_CASES, SMALL_MODELS, bn_cost_ratio, check_kernel_case,
        kernel_case, kernel_ops, measure_torch_model, torch_copy_bandwidth, use_threads,
    )
    from ._model_common import paired_text
    from .report import cpu_model
else:  # run as a script: make the repository root (benchmarks/, numbabn/) importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._common import (BYTES_MOVED, best_of_interleaved, copy_bandwidth,
                                    floor_seconds, markdown_table)
    from benchmarks._torch_common import (
        IMPLS, KERNEL_CASES, KERNEL_OPS, KERNEL_TOLERANCE, MODEL_MODES, MODEL_TOLERANCE,
        MODELS, SMALL_KERNEL_CASES, SMALL_MODELS, bn_cost_ratio, check_kernel_case,
        kernel_case, kernel_ops, measure_torch_model, torch_copy_bandwidth, use_threads,
    )
    from benchmarks._model_common import paired_text
    from benchmarks.report import cpu_model

import numba  # noqa: E402
import numpy as np  # noqa: E402

KERNEL_HEADER = ("case", "op", "numbabn ms", "torch ms", "speed-up vs torch", "floor ms",
                 "numbabn x floor", "torch x floor")
MODEL_HEADER = ("model", "step", "stock torch.nn BN ms", "numbabn ms", "BN removed ms",
                "speed-up vs stock", "per round: median (range), rounds faster",
                "BN cost numbabn / stock")
#: bytes moved per op, in x.nbytes (`_common.BYTES_MOVED`); eval forward = "inference"
OP_BYTES = {"train": "train", "inference": "inference", "backward": "backward"}


def _label(name, spec):
    shape, fmt = spec
    return f"{name.upper()} {shape} {'channels_last' if fmt == 'channels_last' else ''}".strip()


def _copy_bandwidth(x, repeat):
    """The fastest copy of x.nbytes here: np.copyto, a parallel Numba copy, or torch's
    Tensor.copy_ (which PyTorch may run on its own threads)."""
    src = np.random.default_rng(0).standard_normal(x.numel(), dtype=np.float32)
    return max(copy_bandwidth(src, np.empty_like(src), repeat),
               torch_copy_bandwidth(x, repeat))


def measure_kernels(cases, repeat):
    """Check, then time each case; returns (table rows, bandwidths, errors)."""
    rows, bandwidths, errors = [], {}, {}
    for name, spec in cases.items():
        case = kernel_case(name, spec)
        errors[name] = check_kernel_case(case)  # raises if either is wrong
        x = case["x"]
        ops = {impl: kernel_ops(case, impl) for impl in IMPLS}
        fns = {(impl, op): ops[impl][op] for impl in IMPLS for op in KERNEL_OPS}
        # before and after the kernels, the better one (load on a shared machine drifts)
        bandwidth = _copy_bandwidth(x, repeat)
        seconds = best_of_interleaved(fns, repeat)
        bandwidth = bandwidths[name] = max(bandwidth, _copy_bandwidth(x, repeat))
        nbytes = x.numel() * x.element_size()
        for op in KERNEL_OPS:
            ours, theirs = seconds[("numbabn", op)], seconds[("torch", op)]
            floor = floor_seconds(OP_BYTES[op], nbytes, bandwidth)
            rows.append([_label(name, spec), op, f"{1e3 * ours:.3f}", f"{1e3 * theirs:.3f}",
                         f"{theirs / ours:.2f}", f"{1e3 * floor:.3f}",
                         f"{ours / floor:.2f}", f"{theirs / floor:.2f}"])
    return rows, bandwidths, errors


def fmt_ms(v):
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def model_rows(result):
    rows, ms = [], result["ms"]
    for mode in MODEL_MODES:
        t = ms[mode]
        ratio = bn_cost_ratio(ms, mode)
        rows.append([result["model"], "train step" if mode == "train" else "eval forward",
                     fmt_ms(t["stock"]), fmt_ms(t["numbabn"]), fmt_ms(t["no_bn"]),
                     f"{t['stock'] / t['numbabn']:.2f}", paired_text(result["paired"][mode]),
                     "n/a" if np.isnan(ratio) else f"{ratio:.2f}"])
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=None,
                        help="kernel timings: best of N (default 10; 3 with --quick)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="model timings: median of R interleaved rounds (default 7; "
                             "2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="small inputs and models, few repeats (a smoke run)")
    args = parser.parse_args(argv)
    cases, models = ((SMALL_KERNEL_CASES, SMALL_MODELS) if args.quick
                     else (KERNEL_CASES, MODELS))
    repeat = args.repeat or (3 if args.quick else 10)
    rounds = args.rounds or (2 if args.quick else 7)
    min_block = 0.05 if args.quick else 0.5

    import torch

    start = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    threads = use_threads()
    rows, bandwidths, kernel_errors = measure_kernels(cases, repeat)
    bn_rounds = 2 if args.quick else 5
    results = {name: measure_torch_model(name, rounds, min_block, cfg, bn_rounds=bn_rounds)
               for name, cfg in models.items()}
    threads = use_threads()  # again: Numba's threading layer is known by now
    elapsed = time.perf_counter() - start

    print(f"# numbabn.torch vs PyTorch's CPU batch norm{' (--quick)' if args.quick else ''}\n")
    print(f"- date: {date} (start)")
    print(f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); "
          f"Python {platform.python_version()}")
    print(f"- threads: {threads}")
    print(f"- numpy {np.__version__}, numba {numba.__version__}, torch {torch.__version__}")
    print("- copy bandwidth (fastest of np.copyto, a parallel Numba copy and "
          "torch's Tensor.copy_, on x's size): "
          + ", ".join(f"{k.upper()} {v / 1e9:.1f} GB/s" for k, v in bandwidths.items())
          + "\n")
    print("## One BN module, float32\n")
    print(markdown_table(KERNEL_HEADER, rows))
    print()
    moved = ", ".join(f"{op} {BYTES_MOVED[OP_BYTES[op]]}" for op in KERNEL_OPS)
    errors = "; ".join(f"{name.upper()} " + ", ".join(f"{impl} {e:.1g}" for impl, e in
                                                      by.items())
                       for name, by in kernel_errors.items())
    print("\n".join([
        f"- Best of {repeat} runs, numbabn and torch in turns (one process, same threads). "
        "Modules in float32: numbabn.torch.BatchNorm1d/2d vs torch.nn.BatchNorm1d/2d "
        "(eps 1e-5, momentum 0.1, same weight, bias and running statistics). train: a "
        "training-mode forward under torch.no_grad() (batch statistics, running update); "
        "inference: an eval-mode forward under no_grad; backward: torch.autograd.grad of "
        "one training-mode forward to x, weight and bias (the graph retained, so the "
        "backward alone is timed). Both allocate their outputs on every call.",
        "- speed-up vs torch = torch ms / numbabn ms (above 1: numbabn is faster).",
        f"- floor ms: bytes moved / copy bandwidth; bytes moved = x.nbytes times ({moved}). "
        "x floor = ms / floor ms (1.0 = moving the bytes at copy speed; on cache-sized "
        "inputs, (64, 256), it measures per-call overhead instead).",
        "- Checked first against torch's float64 kernel (train output, running statistics, "
        "eval output, dx, dweight, dbias), largest error scaled by 1 + |value|: "
        f"{errors} (limits: {KERNEL_TOLERANCE}; PyTorch's CPU kernel sums in float32).",
    ]))
    print("\n## Whole models\n")
    print(markdown_table(MODEL_HEADER, [r for res in results.values()
                                        for r in model_rows(res)]))
    print()
    notes = [
        f"- Median ms per step over {rounds} rounds; each round times a block of steps of "
        "every (variant, step) in turn, the order rotated each round. train step: "
        "zero_grad, forward (batch statistics), cross entropy, backward, SGD step; eval "
        "forward: model.eval(), forward under no_grad (running statistics).",
        "- stock: the model as written, torch.nn.BatchNorm1d/2d; numbabn: "
        "numbabn.torch.convert(copy.deepcopy(stock)); BN removed: every BN module an "
        "nn.Identity (the bound). BN cost = variant ms - BN-removed ms; the last column "
        "is numbabn's BN cost over stock's (below 1: numbabn's BN costs less).",
        "- speed-up vs stock: the medians' ratio. per round: stock's time over numbabn's "
        "within each round (seconds apart, so the machine's load drifts cancel), the "
        "median and range of those ratios, and in how many rounds numbabn was faster "
        "(all R of R by chance alone: probability 2^-R).",
    ]
    bn_rows = [[res["model"], "train step" if mode == "train" else "eval forward",
                fmt_ms(res["bn_ms"][mode]["stock"]), fmt_ms(res["bn_ms"][mode]["numbabn"]),
                f"{res['bn_ms'][mode]['stock'] / res['bn_ms'][mode]['numbabn']:.2f}"]
               for res in results.values() for mode in MODEL_MODES]
    notes.append("- BN layers inside the step (torch.profiler, `_torch_common.bn_step_ms`): "
                 "the wall time of the BN layers' forward ops and backward nodes, children "
                 f"included, per step, median of {bn_rounds} profiles of 10 steps; the "
                 "module's Python around its op is not in it, for either library. BN is a "
                 "few percent of "
                 "these steps, so this shows what the step's time cannot:\n\n"
                 + markdown_table(("model", "step", "stock BN ms", "numbabn BN ms",
                                   "speed-up"), bn_rows) + "\n")
    for name, res in results.items():
        cfg = res["config"]
        size = f"{cfg['channels']}x{cfg['size']}x{cfg['size']}"
        errs = "; ".join(f"{q} " + ", ".join(f"{v} {e:.2g}" for v, e in by.items())
                         + f" (limit {MODEL_TOLERANCE[q]:.0e})"
                         for q, by in res["errors"].items())
        spread = "; ".join(f"{mode}: " + ", ".join(
            f"{v} {100 * s:.0f} %" for v, s in res["spread"][mode].items())
            for mode in MODEL_MODES)
        notes.append(f"- {name}: input {size}, batch {cfg['batch']}, "
                     + (f"widths {cfg['widths']}, " if "widths" in cfg else "")
                     + f"{res['bn_layers']} BN modules. Relative errors vs the stock model "
                     f"in float64: {errs}. Spread (max - min) / median: {spread}. "
                     f"{res['seconds']['check']:.0f} s to build and check, "
                     f"{res['seconds']['timing']:.0f} s to time.")
    print("\n".join(notes))
    print(f"\nReport took {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
