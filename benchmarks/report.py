"""Print a Markdown report: numbabn's kernels against the copy-bandwidth floor and TF.

Usage (from the repository root; ``make bench`` runs it)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/report.py [--quick]

For each case (ResNet-50's conv2 activation at batch 64, NHWC and NCHW, in float32,
float16 and bfloat16; a half format's floor counts its 2-byte elements) it
checks numbabn and TensorFlow against a float64 NumPy reference, measures the copy
bandwidth, then times every operation (best of 10) and prints one table. ``--quick``
uses 64x smaller inputs. The same helpers back the asv suite (``bench_kernels.py``).
"""

import argparse
import datetime
import os
import platform
import sys

# Before Numba or TensorFlow load: spinning OpenMP threads left by one library's
# kernel slow the other's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__:  # imported by asv's benchmark discovery, as benchmarks.report
    from ._common import (
        BYTES_MOVED, CASES, best_of, check_peer, checked_inputs, copy_bandwidth,
        first_call_cold, first_call_warm, floor_seconds, markdown_table, numbabn_ops,
        tf_ops,
    )
else:  # run as a script: make the repository root (benchmarks/ and numbabn/) importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._common import (
        BYTES_MOVED, CASES, best_of, check_peer, checked_inputs, copy_bandwidth,
        first_call_cold, first_call_warm, floor_seconds, markdown_table, numbabn_ops,
        tf_ops,
    )

import numba  # noqa: E402
import numpy as np  # noqa: E402

OPS = ("train", "inference", "backward", "stats")
#: float32, then the half formats (float16; bfloat16 where ml_dtypes is installed)
NAMES = [name for name in ("nhwc", "nchw", "nhwc-f16", "nchw-f16", "nhwc-bf16", "nchw-bf16")
         if name in CASES]
FULL = {name: CASES[name] for name in NAMES}
QUICK = {name: (((8, 28, 28, 32), 3) if name.startswith("nhwc") else ((8, 32, 28, 28), 1))
         + CASES[name][2:] for name in NAMES}
HEADER = ("case", "op", "numbabn ms", "floor ms", "x floor", "numbabn alloc ms",
          "TF fused ms", "speed-up vs TF")


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def tensorflow_version():
    try:
        import tensorflow as tf
    except ImportError:
        return None
    return tf.__version__


def measure(label, shape, axis, dtype, repeat):
    """Check, then time one case; returns (copy bandwidth in B/s, table rows, notes)."""
    inp, ref = checked_inputs(shape, axis, dtype)  # raises if numbabn is wrong
    x = inp["x"]
    out = np.empty_like(x)
    nb, nb_alloc = numbabn_ops(inp, out), numbabn_ops(inp, None)
    notes = []
    try:
        tf = tf_ops(inp)
        check_peer("TF", tf, ref)
    except NotImplementedError as exc:
        tf = {}
        notes.append(f"{label}: TensorFlow not timed ({exc})")
    # Copy bandwidth before and after the kernels, the better one: on a shared machine
    # it drifts, and a drop during one measurement should not move the floor.
    bandwidth = copy_bandwidth(x, out, repeat)
    times = {op: best_of(nb[op], repeat) for op in OPS}
    bandwidth = max(bandwidth, copy_bandwidth(x, out, repeat))
    rows = []
    for op in OPS:
        t, floor = times[op], floor_seconds(op, x.nbytes, bandwidth)
        row = [label, op, f"{t * 1e3:.2f}", f"{floor * 1e3:.2f}", f"{t / floor:.2f}"]
        if op in tf:
            # TF allocates its outputs on every call: compare with numbabn's
            # allocating call, not the out= one (fresh pages cost a few ms here).
            t_alloc, t_tf = best_of(nb_alloc[op], repeat), best_of(tf[op], repeat)
            row += [f"{t_alloc * 1e3:.2f}", f"{t_tf * 1e3:.2f}", f"{t_tf / t_alloc:.2f}"]
        else:
            row += ["-", "-", "-"]
        rows.append(row)
    return bandwidth, rows, notes


def markdown(rows):
    return markdown_table(HEADER, rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="64x smaller inputs and fewer repeats (a smoke test)")
    args = parser.parse_args(argv)
    cases, repeat = (QUICK, 3) if args.quick else (FULL, 10)

    rows, notes, bandwidths = [], [], []
    for name, (shape, axis, dtype) in cases.items():
        label = f"{name.split('-')[0].upper()} {shape} axis {axis} {np.dtype(dtype).name}"
        bandwidth, case_rows, case_notes = measure(label, shape, axis, dtype, repeat)
        rows += case_rows
        notes += case_notes
        bandwidths.append(f"{name} {bandwidth / 1e9:.1f} GB/s")
    cold, warm = first_call_cold(), first_call_warm()

    print(f"# numbabn kernel benchmark{' (--quick)' if args.quick else ''}\n")
    print(f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"- CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(f"- threads: {numba.get_num_threads()} (Numba threading layer "
          f"{numba.threading_layer()})")
    print(f"- numpy {np.__version__}, numba {numba.__version__}, "
          f"tensorflow {tensorflow_version() or 'not installed'}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    print(f"- copy bandwidth (faster of np.copyto and a parallel Numba copy): "
          f"{', '.join(bandwidths)}\n")
    print(markdown(rows))
    print()
    moved = ", ".join(f"{op} {BYTES_MOVED[op]}" for op in OPS)
    print("\n".join([
        f"- Times are the best of {repeat} runs. numbabn ms: writing into a "
        "preallocated `out=`.",
        "- floor ms: bytes moved / copy bandwidth; bytes moved = x.nbytes times "
        f"({moved}). x floor = numbabn ms / floor ms; the floor is a model, so "
        "read-heavy operations can beat it slightly.",
        "- numbabn alloc ms: the same call allocating its output, as TF does; "
        "speed-up vs TF = TF fused ms / numbabn alloc ms.",
        "- TF fused: tf.raw_ops.FusedBatchNormV3 (train, inference) and "
        "FusedBatchNormGradV3 (backward) with the case's data_format; TF's CPU kernel "
        "transposes NCHW to NHWC and back inside the op.",
        "- stats: the statistics pass alone (numbabn.stages.batch_moments), no TF "
        "counterpart.",
    ]))
    for note in notes:
        print(f"\nNote: {note}")
    print(f"\nFirst call in a new process (import numpy and numbabn, then float32 NHWC "
          f"train + backward on (8, 4, 4, 16); interpreter start-up excluded): "
          f"{cold:.2f} s with an empty kernel cache (compiling), {warm:.2f} s with a "
          "populated one.")


if __name__ == "__main__":
    main()
