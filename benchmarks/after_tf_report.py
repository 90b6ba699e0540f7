"""numbabn's kernels right after a TensorFlow op: what TensorFlow's idle threads cost them.

Inside a model step numbabn's ops take 2-4x the time the same shapes take alone
(``model_trace.py``). This isolates one cause: numbabn's C entry points (what the
TensorFlow op calls; here through ctypes, no TensorFlow around them) timed alone, and
right after a ``tf.matmul`` that ran on TensorFlow's intra-op thread pool, minus the
matmul alone. TensorFlow's pool threads keep spinning for a while after their work, on
the same cores the kernels' threads (or the one calling thread, for the serial twins)
then run on. All in one process, in turns, best of N.

Usage: ``OMP_WAIT_POLICY=PASSIVE python benchmarks/after_tf_report.py [--repeat 30]``
"""

import argparse
import ctypes
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks._common import best_of_interleaved, markdown_table  # noqa: E402

#: (32, 16, 16, 256) runs the parallel entry points, (32, 8, 8, 192) the serial twins
SHAPES = ((32, 16, 16, 256), (32, 8, 8, 192))
_P = ctypes.c_void_p
#: inference(x, y, gamma, beta, moving_mean, moving_var, outer, C, inner, eps)
_INFERENCE = ctypes.CFUNCTYPE(None, _P, _P, _P, _P, _P, _P, ctypes.c_int64, ctypes.c_int64,
                              ctypes.c_int64, ctypes.c_double)


def inference_calls(shape):
    """``{"parallel": fn, "serial": fn}``: the float32 inference entry points on ``shape``."""
    from numbabn import _kernels_cpu

    entries = _kernels_cpu.c_entry_points("float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    c = shape[-1]
    arrays = (x, np.empty_like(x), np.ones(c), np.zeros(c), np.zeros(c), np.ones(c))
    args = [a.ctypes.data for a in arrays] + [x.size // c, c, 1, 1e-3]
    fns = {kind: _INFERENCE(entries[name]) for kind, name in
           (("parallel", "inference"), ("serial", "serial_inference"))}
    want = (x - 0.0) / np.sqrt(1.0 + 1e-3)
    for fn in fns.values():  # checked before timing
        arrays[1][...] = np.nan
        fn(*args)
        np.testing.assert_allclose(arrays[1], want, rtol=1e-6)
    # the arrays stay alive with the closures
    return {kind: (lambda fn=fn, arrays=arrays: fn(*args)) for kind, fn in fns.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)
    import tensorflow as tf

    a = tf.constant(np.ones((512, 512), np.float32))

    def matmul():
        tf.matmul(a, a).numpy()

    rows = []
    for shape in SHAPES:
        calls = inference_calls(shape)
        fns = {"matmul": matmul}
        for kind, fn in calls.items():
            fns[kind] = fn
            fns[kind + " after"] = lambda fn=fn: (matmul(), fn())
        t = best_of_interleaved(fns, repeat=args.repeat)
        for kind in calls:
            alone, after = t[kind], t[kind + " after"] - t["matmul"]
            rows.append([str(shape), kind, f"{alone * 1e6:.0f}", f"{after * 1e6:.0f}",
                         f"{after / alone:.2f}x"])
    print(f"# numbabn's float32 inference entry points alone and right after a tf.matmul "
          f"(512 x 512, {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}"
          " intra-op threads)\n")
    print(markdown_table(("shape (NHWC)", "entry point", "alone us", "after a TF op us",
                          "slowdown"), rows))
    print(f"\nBest of {args.repeat} in turns; 'after' = (matmul then kernel) - matmul alone.")


if __name__ == "__main__":
    main()
