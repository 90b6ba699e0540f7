"""Print a Markdown report: whole Keras models, stock BN vs numbabn vs TF's fused op vs
no BN at all.

Usage (from the repository root; ``make bench`` runs it)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/model_report.py [--models M ...]
        [--repeat N] [--batch B] [--size S] [--quick]

For each model (``keras.applications`` ResNet50 and MobileNetV2, ``weights=None``,
S x S x 3 inputs, 10 classes, batch B; 64, 32 by default) it builds the model once and
clones it into four variants with the same weights: stock Keras BN, numbabn's layer
(``keras_layer.convert``), TF's fused op in a Keras layer, and BN replaced by Identity
(the bound). It checks predictions, loss, moving statistics and weight updates against
the stock model, then times ``train_on_batch`` and ``predict_on_batch`` of the four in
turns, N rounds (7 by default), and prints the median per step. ``--quick``: small
stand-in models (32 x 32, batch 2, 3 rounds), a smoke run. The asv suite
``bench_models.py`` uses the same helpers (``_model_common.py``).
"""

import argparse
import datetime
import os
import platform
import sys
import time

# Before Numba or TensorFlow load: spinning OpenMP threads left by one library's
# kernel slow the other's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__:  # imported by asv's benchmark discovery, as benchmarks.model_report
    from ._common import copy_bandwidth
    from ._keras_common import thread_info
    from ._model_common import (
        FULL, MODELS, MODES, TINY, TOLERANCE, bn_cost_ratio, measure_model,
        paired_text, speedup_vs_stock,
    )
    from .report import cpu_model
else:  # run as a script: make the repository root (benchmarks/, numbabn/) importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._common import copy_bandwidth
    from benchmarks._keras_common import thread_info
    from benchmarks._model_common import (
        FULL, MODELS, MODES, TINY, TOLERANCE, bn_cost_ratio, measure_model,
        paired_text, speedup_vs_stock,
    )
    from benchmarks.report import cpu_model

import numba  # noqa: E402
import numpy as np  # noqa: E402

HEADER = ("model, ms per step", "stock Keras BN", "numbabn", "TF fused op in a Keras layer",
          "BN removed (bound)", "numbabn vs stock",
          "per round: median (range), rounds faster", "BN cost numbabn / fused")
COLUMNS = ("stock", "numbabn", "fused", "no_bn")


def fmt_ms(v):
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def table(header, rows):
    """A Markdown table, the first column left-aligned and the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def rows_and_notes(result, label):
    rows, notes = [], []
    ms = result["ms"]
    for mode in MODES:
        t = ms[mode]
        ratio = bn_cost_ratio(ms, mode)
        rows.append([f"{label} {mode}", *(fmt_ms(t[k]) for k in COLUMNS),
                     f"{speedup_vs_stock(ms, mode):.2f}", paired_text(result["paired"][mode]),
                     "n/a" if np.isnan(ratio) else f"{ratio:.2f}"])
        cost = ", ".join(f"{k} {fmt_ms(t[k] - t['no_bn'])}" for k in COLUMNS[:3])
        spread = ", ".join(f"{k} {100 * result['spread'][mode][k]:.0f} %" for k in COLUMNS)
        notes.append(f"{label} {mode}: BN cost (variant - bound) in ms: {cost}. Spread "
                     f"(max - min) / median over the rounds: {spread}.")
    errors = "; ".join(f"{q} " + ", ".join(f"{k} {e:.2g}" for k, e in by.items())
                       + f" (tolerance {TOLERANCE[q]:.0e})"
                       for q, by in result["errors"].items())
    s = result["seconds"]
    notes.append(f"{label}: {result['bn_layers']} BN layers in {result['layers']}; checked "
                 f"against stock, relative errors: {errors}. Took {s['build']:.0f} s to "
                 f"build, {s['check']:.0f} s to check (tracing included), "
                 f"{s['timing']:.0f} s to time.")
    return rows, notes


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS),
                        help="models to run (default: all)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="rounds of interleaved timing, the median kept (default 7; "
                             "3 with --quick)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"batch size (default {FULL['batch']}; {TINY['batch']} with "
                             "--quick)")
    parser.add_argument("--size", type=int, default=None,
                        help=f"input height and width (default {FULL['size']}; "
                             f"{TINY['size']} with --quick; at least 32)")
    parser.add_argument("--quick", action="store_true",
                        help="small stand-in models, 32x32, batch 2, 3 rounds (smoke test)")
    args = parser.parse_args(argv)
    cfg = dict(TINY if args.quick else FULL)
    cfg.update({k: v for k, v in (("batch", args.batch), ("size", args.size))
                if v is not None})
    rounds = args.repeat or (3 if args.quick else 7)
    min_block = 0.05 if args.quick else 0.5

    import keras
    import tensorflow as tf

    start = time.perf_counter()
    date = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    # copy bandwidth in this process, on ResNet-50's conv2 activation at batch 64 as in
    # report.py (51 MB of float32; 8x smaller with --quick)
    elements = 64 * 56 * 56 * 64 // (8 if args.quick else 1)
    src = np.random.default_rng(0).standard_normal(elements, dtype=np.float32)
    bandwidth = copy_bandwidth(src, np.empty_like(src))
    threads = thread_info()
    rows, notes = [], []
    for name in args.models:
        result = measure_model(name, rounds=rounds, min_block=min_block, **cfg)
        label = MODELS[name] + (" (small stand-in)" if cfg["tiny"] else "")
        model_rows, model_notes = rows_and_notes(result, label)
        rows += model_rows
        notes += model_notes
    elapsed = time.perf_counter() - start

    title = "# Whole-model benchmark: BatchNormalization inside Keras models"
    print(f"{title}{' (--quick)' if args.quick else ''}\n")
    print(f"- date: {date} (start)")
    print(f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); "
          f"Python {platform.python_version()}")
    print(f"- threads: {threads}")
    print(f"- tensorflow {tf.__version__}, keras {keras.__version__}, numba "
          f"{numba.__version__}, numpy {np.__version__}")
    print(f"- copy bandwidth (faster of np.copyto and a parallel Numba copy, "
          f"{src.nbytes / 1e6:.0f} MB): {bandwidth / 1e9:.1f} GB/s")
    size = f"{cfg['size']}x{cfg['size']}x3"
    print(f"- models: keras.applications, weights=None, input {size}, {cfg['classes']} "
          f"classes (logits), batch {cfg['batch']}, float32 channels last; "
          "SGD + SparseCategoricalCrossentropy(from_logits=True), jit_compile=False"
          + ("; --quick: small stand-in models of the same kind" if cfg["tiny"] else "")
          + "\n")
    print(table(HEADER, rows))
    print()
    print("\n".join([
        f"- Median ms per step over {rounds} rounds; each round times a block of steps of "
        "every (variant, mode) in turn (the order rotated each round), so a change of "
        "load hits all variants alike. train: model.train_on_batch(x, y) (forward with "
        "batch statistics, moving update, backward, SGD step); inference: "
        "model.predict_on_batch(x) (moving statistics).",
        "- stock: keras.layers.BatchNormalization as built (Keras 3: tf.nn.moments + "
        "batch_normalization, unfused). numbabn: keras_layer.convert(model). fused: a "
        "keras.layers.BatchNormalization subclass calling tf.raw_ops.FusedBatchNormV3 "
        "(gradient FusedBatchNormGradV3) with Keras's moving update. bound: every BN "
        "replaced by an Identity layer, same weights otherwise.",
        "- numbabn vs stock = stock ms / numbabn ms (the medians). per round: stock's "
        "time over numbabn's within each round (seconds apart, so the machine's load "
        "drifts cancel), the median and range of those ratios, and in how many rounds "
        "numbabn was faster (all R of R by chance alone: probability 2^-R).",
        "- BN cost = variant ms - bound ms; the "
        "last column is numbabn's BN cost over the fused op's (below 1: numbabn's BN "
        "layers cost less than TF's fused kernel in the same model).",
    ] + [f"- {note}" for note in notes]))
    print(f"\nReport took {elapsed:.0f} s.")


if __name__ == "__main__":
    main()
