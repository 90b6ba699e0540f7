"""Print a Markdown report: the Keras layer, stock vs numbabn vs TF's fused op, and the
cost of the tf.numpy_function bridge.

Usage (from the repository root)::

    python benchmarks/keras_report.py [--repeat N]

For each case (ResNet-50's conv2 activation at batch 64, (64, 56, 56, 64) float32 NHWC,
51 MB, a cache-sized (32, 8, 8, 16), and the demo LeNet's dense (128, 120)) it builds the three layers from the same
weights, checks that outputs, gradients and moving statistics agree with the stock
layer, then times one training step and one inference call inside ``tf.function``
(best of N, all in this process). The asv suite ``bench_keras.py`` uses the same helpers.
"""

import argparse
import datetime
import os
import platform
import sys

# Before Numba or TensorFlow load: spinning OpenMP threads left by one library's
# kernel slow the other's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__:  # imported by asv's benchmark discovery, as benchmarks.keras_report
    from ._keras_common import (
        KERAS_CASES, TIMED, bridge_timings, build_fns, check_agreement, glue_fn, kernel_fns,
        thread_info, zero_copy,
    )
    from ._common import best_of_interleaved, markdown_table
    from .report import cpu_model
else:  # run as a script: make the repository root (benchmarks/, numbabn/) importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._keras_common import (
        KERAS_CASES, TIMED, bridge_timings, build_fns, check_agreement, glue_fn, kernel_fns,
        thread_info, zero_copy,
    )
    from benchmarks._common import best_of_interleaved, markdown_table
    from benchmarks.report import cpu_model

import numpy as np  # noqa: E402

#: the asv suite's cases, and a dense layer's (LeNet's first fully connected BN, batch 128)
REPORT_CASES = dict(KERAS_CASES, dense=((128, 120), 1, np.float32))

HEADER = ("case", "op", "stock ms", "numbabn ms", "fused ms", "speed-up vs stock",
          "vs fused")


def measure(name, shape, axis, dtype, repeat):
    """Check agreement, then time every (kind, op), in turns; returns rows and notes."""
    fns = build_fns(shape, axis, dtype)
    check_agreement(fns)  # raises AssertionError before timing if a layer is wrong
    flat = {(kind, op): f[op] for kind, f in fns.items() for op in TIMED}
    flat.update({("alone", op): f for op, f in kernel_fns(shape, axis, dtype).items()})
    flat["glue"] = glue_fn(shape, axis, dtype)
    t = best_of_interleaved(flat, repeat)
    label = f"{name.upper()} {shape}"
    rows = []
    for op in TIMED:
        stock, ours, fused = (t[(k, op)] for k in ("stock", "numbabn", "fused"))
        rows.append([label, op, f"{stock * 1e3:.3f}", f"{ours * 1e3:.3f}",
                     f"{fused * 1e3:.3f}", f"{stock / ours:.2f}", f"{fused / ours:.2f}"])
    notes = [f"{label}: of each train time, {t['glue'] * 1e3:.3f} ms is the loss plumbing "
             "(y * w, its sum and their gradient: the same tf.function with y = x). "
             f"numbabn's kernels called from NumPy, no TensorFlow: train (forward, moving "
             f"update, backward) {t[('alone', 'train')] * 1e3:.3f} ms, inference "
             f"{t[('alone', 'inference')] * 1e3:.3f} ms."]
    return rows, notes


def markdown(rows):
    return markdown_table(HEADER, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=10, help="best of N (default 10)")
    args = parser.parse_args(argv)

    import keras
    import tensorflow as tf

    rows, notes = [], []
    for name, case in REPORT_CASES.items():
        case_rows, case_notes = measure(name, *case, args.repeat)
        rows += case_rows
        notes += case_notes
    bridge = bridge_timings(max(args.repeat, 20))
    out_aligned, in_zero = zero_copy(0)
    out_unaligned, _ = zero_copy(16)
    mb = np.prod(KERAS_CASES["nhwc"][0]) * 4 / 1e6

    print("# Keras layer benchmark: keras.layers vs keras_layer BatchNormalization\n")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs); {platform.python_version()}")
    print(f"- threads: {thread_info()}")
    print(f"- tensorflow {tf.__version__}, keras {keras.__version__}, numpy {np.__version__}; "
          "all float32, channels last, tf.function without XLA\n")
    print(markdown(rows))
    print()
    print("\n".join([
        f"- Best of {args.repeat} calls. train, in a tf.function: forward with batch "
        "statistics + moving-average update + gradients to x, gamma, beta "
        "(tape.gradient of sum(y * w), w fixed); inference: training=False in a "
        "tf.function; eager: one training=True call outside tf.function (y + moving "
        "update, no gradient).",
        "- stock: keras.layers.BatchNormalization (Keras 3: tf.nn.moments + "
        "tf.nn.batch_normalization, unfused). numbabn: keras_layer.BatchNormalization. "
        "fused: tf.raw_ops.FusedBatchNormV3 + FusedBatchNormGradV3, moving update as Keras.",
        "- speed-up = stock (or fused) ms / numbabn ms. All three were checked against the "
        "stock layer first (y, dx, dgamma, dbeta, moving statistics, inference y, eager y).",
    ] + [f"- {note}" for note in notes]))

    us = lambda s: f"{s * 1e6:.0f} us"  # noqa: E731
    ms = lambda s: f"{s * 1e3:.2f} ms"  # noqa: E731
    print("\n## The tf.numpy_function bridge\n")
    print("\n".join([
        f"- Per call: a tf.function running a NumPy no-op on a 4-element tensor takes "
        f"{us(bridge['noop'])}, vs {us(bridge['identity'])} with tf.identity: "
        f"{us(bridge['noop'] - bridge['identity'])} per numpy_function call (numbabn's "
        "train step makes 2, inference 1).",
        f"- Inputs: TF hands its buffer to NumPy without a copy: {in_zero} "
        "(pointers compared inside a tf.function).",
        f"- Outputs: TF keeps the returned array's buffer when it is 64-byte aligned: "
        f"{out_aligned}; at 16 bytes (np.empty's alignment for large arrays): "
        f"{out_unaligned} (pointers compared).",
        f"- At {mb:.0f} MB, returning a preallocated array: aligned "
        f"{ms(bridge['prealloc_aligned'])}, unaligned {ms(bridge['prealloc_unaligned'])}: "
        f"TF's copy costs {ms(bridge['prealloc_unaligned'] - bridge['prealloc_aligned'])}.",
        f"- At {mb:.0f} MB, a fresh array filled in NumPy: aligned "
        f"{ms(bridge['fresh_aligned'])}, at np.empty's 16 bytes "
        f"{ms(bridge['fresh_unaligned'])} (difference "
        f"{ms(bridge['fresh_unaligned'] - bridge['fresh_aligned'])}). NumPy's own copy into "
        f"a fresh array takes {ms(bridge['numpy_copy'])}"
        + (f", {ms(bridge['numpy_copy_4k'])} with its transparent-huge-page request off "
           "(TF's allocations, like that, fault in 4 KiB pages)"
           if "numpy_copy_4k" in bridge else "") + ".",
    ]))


if __name__ == "__main__":
    main()
