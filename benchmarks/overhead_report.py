"""Per-call cost on small inputs: numbabn's NumPy API against plain NumPy.

Small layers are where the Python around a kernel shows: each numbabn call is one
validation step and one compiled call (``numbabn._kernels_cpu``'s whole operations).
Allocating calls (a fresh output each time, as a training loop makes them), float32,
best of N in turns, in one process; every result checked against the NumPy version
first.

Usage: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/overhead_report.py``
"""

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import numbabn as nbn  # noqa: E402
from benchmarks._common import (  # noqa: E402
    EPS, best_of_interleaved, make_inputs, markdown_table,
)
from benchmarks._numpy_bn import numpy_ops  # noqa: E402

#: (N, C) float32 from 1e3 to 1e6 elements; (64, 256) is the issue's dense layer
SHAPES = [(10, 100), (100, 100), (64, 256), (1000, 100), (10_000, 100)]
OPS = ("train", "inference", "backward")


def numbabn_ops(inp):
    x, dy, axis = inp["x"], inp["dy"], inp["axis"]
    g, b, mm, mv = (inp[k] for k in ("gamma", "beta", "moving_mean", "moving_var"))
    _, stats = nbn.batch_norm_train(x, g, b, axis=axis, eps=EPS)
    return {"train": lambda: nbn.batch_norm_train(x, g, b, axis=axis, eps=EPS),
            "inference": lambda: nbn.batch_norm_inference(x, g, b, mm, mv, axis=axis,
                                                          eps=EPS),
            "backward": lambda: nbn.batch_norm_backward(dy, x, g, stats, axis=axis)}


def measure(shape, repeat):
    inp = make_inputs(shape, 1, np.float32)  # numpy_ops wants a non-negative axis
    ours, peer = numbabn_ops(inp), numpy_ops(inp, EPS)
    for op in OPS:  # check before timing
        a, b = np.asarray(ours[op]()[0] if op != "inference" else ours[op]()), None
        b = peer[op]()
        b = b[0] if isinstance(b, tuple) else b
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
    fns = {("numbabn", op): ours[op] for op in OPS}
    fns.update({("numpy", op): peer[op] for op in OPS})
    t = best_of_interleaved(fns, repeat)
    return [[f"{shape}", op, f"{t[('numbabn', op)] * 1e6:.1f}", f"{t[('numpy', op)] * 1e6:.1f}",
             f"{t[('numpy', op)] / t[('numbabn', op)]:.1f}"] for op in OPS]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args(argv)
    rows = [row for shape in SHAPES for row in measure(shape, args.repeat)]
    print("# Per-call cost on small inputs: numbabn vs NumPy (float32, allocating)\n")
    print(markdown_table(("shape (N, C)", "op", "numbabn us", "NumPy us", "speed-up"), rows))
    print(f"\nBest of {args.repeat} in turns; {nbn.__name__} threads: "
          f"{__import__('numba').get_num_threads()} (inputs under 2**19 elements run on one).")


if __name__ == "__main__":
    main()
