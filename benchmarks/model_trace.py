"""Where a model step's time goes: TensorFlow's profiler trace, BN layers' ops summed.

``model_report.py`` measures a BN layer's cost as the model's step time minus the
step time of the same model without BN: a difference of two noisy numbers, and blind
to where the time goes. This traces steps instead (``tf.profiler``, the same trace
TensorBoard's profiler shows) and adds up the time of the ops that belong to the BN
layers, attributed by the layers' name scopes (the forward ops, their gradients and the
moving-average updates; the optimizer's update of gamma and beta is outside them and
costs the same in every variant), per variant (stock Keras, numbabn's layer, TF's fused
op), mode and op type; then numbabn's ops per input shape beside what the same shape
costs alone (numbabn's NumPy API into preallocated outputs, hot caches, best of 5):
the ratio says how much slower a call runs inside the model than alone; and beside both,
the floor: the bytes those passes must move at the copy bandwidth of the same run.

numbabn's ops run inline on the executor's thread (``IsExpensive`` is false), which
TensorFlow traces only at the verbose level; they trace themselves (``TraceMe`` in
``numbabn_ops.cc``) so that they show at the default level, as here.

Usage (from the repository root)::

    OMP_WAIT_POLICY=PASSIVE python benchmarks/model_trace.py [--models M ...] [--steps N]

Op times are wall times on the thread that ran them, profiler overhead included; the
traced steps run slower than untraced ones. Read the columns against each other.
"""

import argparse
import collections
import glob
import os
import re
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks._common import (  # noqa: E402
    BYTES_MOVED, best_of_interleaved, copy_bandwidth, markdown_table, settle_compiled_op,
)
from benchmarks._model_common import (  # noqa: E402
    FULL, MODELS, MODES, bn_layers, build_base, build_variants, make_data,
)

TRACED = ("stock", "numbabn", "fused")
KINDS = ("inside", "alone", "floor")  # columns of the per-shape table


def _op_events(logdir):
    """``[(op name, op type, ms)]`` of every op event in the trace under ``logdir``."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    events = []
    for path in glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True):
        space = xplane_pb2.XSpace()
        with open(path, "rb") as f:
            space.ParseFromString(f.read())
        for plane in space.planes:
            names = {k: v.name for k, v in plane.event_metadata.items()}
            for line in plane.lines:
                if not line.name.startswith("tf_Compute"):
                    continue  # the executor's threads run the graph's ops
                for ev in line.events:
                    name = names.get(ev.metadata_id, "")
                    if ":" not in name:  # containers (Process, ParallelFor, ...)
                        continue
                    op, typ = name.rsplit(":", 1)
                    events.append((op, typ, ev.duration_ps / 1e9))
    return events


def _bn_scope(names):
    """A function: op name -> the BN layer it belongs to, or None. tf.function's name
    scopes add ``_1``-style suffixes to a layer's name, hence the pattern."""
    pattern = re.compile(r"(?:^|/)(" + "|".join(map(re.escape, names)) + r")(?:_\d+)?(?:/|$)")

    def scope(op):
        m = pattern.search(op)
        return m.group(1) if m else None

    return scope


def trace_steps(step, steps, logdir):
    """Op events of ``steps`` calls of ``step`` (after two untraced warm-up calls)."""
    import tensorflow as tf

    for _ in range(2):
        step()
    tf.profiler.experimental.start(logdir)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    wall = (time.perf_counter() - t0) / steps
    tf.profiler.experimental.stop()
    return _op_events(logdir), wall


def profile_model(name, steps=3, cfg=FULL):
    """``{(variant, mode): summary}``: wall ms per traced step, all op ms, BN ops' ms,
    BN ms by op type, and numbabn's op ms by BN layer (all per step)."""
    base = build_base(name, cfg["size"], cfg["classes"], cfg["tiny"], cfg["batch"])
    models = build_variants(base)
    x, y = make_data(cfg["size"], cfg["batch"], cfg["classes"])
    models["numbabn"].train_on_batch(x, y)  # builds numbabn's ops, then
    settle_compiled_op()  # their parallel entry points compiled (cold cache: background)
    bns = bn_layers(base)
    scope = _bn_scope([layer.name for layer in bns])
    out = {}
    for variant in TRACED:
        model = models[variant]
        fns = {"train": lambda m=model: m.train_on_batch(x, y),
               "inference": lambda m=model: m.predict_on_batch(x)}
        for mode in MODES:
            with tempfile.TemporaryDirectory() as logdir:
                events, wall = trace_steps(fns[mode], steps, logdir)
            by_type, by_layer = collections.Counter(), collections.Counter()
            total = bn = 0.0
            for op, typ, ms in events:
                total += ms
                layer = scope(op)
                # a convolution that grappler fused BN into may carry the BN's name: it
                # is the convolution's time (BN folded in costs nothing extra)
                if layer is not None and "Conv" not in typ:
                    bn += ms
                    by_type[typ] += ms / steps
                    by_layer[layer] += ms / steps
            out[(variant, mode)] = dict(wall=1e3 * wall, ops=total / steps, bn=bn / steps,
                                        by_type=by_type, by_layer=by_layer)
    shapes = {layer.name: ((cfg["batch"],) + tuple(layer.input.shape[1:]),
                           layer.axis % len(layer.input.shape)) for layer in bns}
    return out, shapes


def alone_ms(shape, axis):
    """numbabn's NumPy API on one shape, into preallocated outputs, best of 5 in turns:
    ``{"train": forward + backward ms, "inference": ms}``."""
    import numbabn

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[axis]
    g, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)
    _, stats = numbabn.batch_norm_train(x, g, b, axis=axis)

    def train():
        _, s = numbabn.batch_norm_train(x, g, b, axis=axis, out=y)
        numbabn.batch_norm_backward(dy, x, g, s, axis=axis, out=dx)

    def inference():
        numbabn.batch_norm_inference(x, g, b, stats.mean, stats.var, axis=axis, out=y)

    t = best_of_interleaved({"train": train, "inference": inference}, repeat=5)
    return {k: 1e3 * v for k, v in t.items()}


def floor_ms(shape, mode, bandwidth):
    """What one BN layer's passes over a float32 activation of ``shape`` would take at
    copy ``bandwidth``: train = forward + backward, inference (`BYTES_MOVED`)."""
    passes = (BYTES_MOVED["train"] + BYTES_MOVED["backward"] if mode == "train"
              else BYTES_MOVED["inference"])
    return 1e3 * passes * 4 * np.prod(shape) / bandwidth


def report(name, steps, bandwidth):
    profile, shapes = profile_model(name, steps)
    label = MODELS[name]
    rows = []
    for mode in MODES:
        for variant in TRACED:
            p = profile[(variant, mode)]
            top = ", ".join(f"{t} {ms:.1f}" for t, ms in p["by_type"].most_common(4))
            rows.append([f"{label} {mode}", variant, f"{p['wall']:.1f}", f"{p['ops']:.1f}",
                         f"{p['bn']:.1f}", top])
    print(markdown_table(("model, mode", "variant", "traced step ms", "all ops ms",
                          "BN layers' ops ms", "largest BN op types, ms"), rows))
    print()
    # numbabn's ops per input shape: inside the model vs alone
    groups = collections.defaultdict(list)
    for layer, key in shapes.items():
        groups[key].append(layer)
    rows = []
    sums = collections.Counter()
    for (shape, axis), layers in sorted(groups.items(), key=lambda kv: -np.prod(kv[0][0])):
        alone = alone_ms(shape, axis)
        row = [f"{shape} ({axis})", str(len(layers))]
        for mode in MODES:
            inside = sum(profile[("numbabn", mode)]["by_layer"][l] for l in layers)
            cells = {"inside": inside, "alone": len(layers) * alone[mode],
                     "floor": len(layers) * floor_ms(shape, mode, bandwidth)}
            row += [f"{cells[kind]:.2f}" for kind in KINDS]
            for kind in KINDS:
                sums[mode, kind] += cells[kind]
        rows.append(row)
    rows.append([f"**sum, {label}**", str(len(shapes))] + [
        f"{sums[mode, kind]:.1f}" for mode in MODES for kind in KINDS])
    print(markdown_table(("input shape (axis)", "layers") + tuple(
        f"{mode}: {kind} ms" for mode in MODES
        for kind in ("in model", "alone", "floor")), rows))
    print()
    return profile


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=3, help="traced steps per variant")
    args = parser.parse_args(argv)
    src = np.random.default_rng(0).standard_normal(64 * 56 * 56 * 64, dtype=np.float32)
    bandwidth = copy_bandwidth(src, np.empty_like(src))
    del src
    print(f"# BN layers inside whole models: a profiler trace of {args.steps} steps per "
          f"variant (input {FULL['size']}x{FULL['size']}, batch {FULL['batch']})\n")
    print(f"Copy bandwidth in this run: {bandwidth / 1e9:.1f} GB/s (51 MB)\n")
    for name in args.models:
        report(name, args.steps, bandwidth)
    print("In model: the BN layers' ops in the trace (numbabn: its forward op, its "
          "gradient op and the moving-average update), per step. Alone: the same shapes "
          "through numbabn's NumPy API with out=, hot caches (train = forward + "
          "backward). Floor: the bytes those passes must move (train: forward 3 + backward "
          "5 passes over the activation, inference 2) at the copy bandwidth above.")


if __name__ == "__main__":
    main()
