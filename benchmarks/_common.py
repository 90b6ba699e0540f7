"""Helpers shared by the asv suite and ``report.py``: inputs, checks, timing, floors.

asv imports every module of this package while it discovers benchmarks, so nothing here
may be named ``time_*``, ``track_*``, ``peakmem_*`` or ``mem_*``.
"""

import importlib
import os
import subprocess
import sys
import tempfile
import timeit

# Must precede the first import of Numba or TensorFlow: OpenMP threads left spinning
# after a parallel kernel slow the other library's next operation (TF's fused BN ran
# ~1.4x slower with OMP_WAIT_POLICY=ACTIVE on the 2-core machine these were tuned on).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter

import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402

import numbabn as nbn  # noqa: E402
from numbabn.stages import batch_moments  # noqa: E402

try:  # bfloat16 is ml_dtypes' (an optional dependency of numbabn, installed with TF)
    from ml_dtypes import bfloat16  # noqa: E402
except ImportError:
    bfloat16 = None

EPS = 1e-3

#: name -> (shape, channel axis, dtype). "nhwc"/"nchw" are ResNet-50's conv2 activation
#: at batch 64 in both layouts (51 MB in float32); "nc" is a dense layer's (N, C)
#: activation with as many elements; the small ones stay in cache. "nhwc-l3" (8 MB, 256
#: channels: four of ResNet-50's BN inputs at 64 x 64 inputs, batch 32) fits the 32 MB L3
#: of the machines here but not L2: only `ab_gate` times it (not the asv suite), since the
#: large cases did not show a kernel change that ran 2.3x slower there.
CASES = {
    "nhwc": ((64, 56, 56, 64), 3, np.float32),
    "nchw": ((64, 64, 56, 56), 1, np.float32),
    "nc": ((50176, 256), 1, np.float32),
    "nhwc-f16": ((64, 56, 56, 64), 3, np.float16),
    "nc-f64": ((50176, 256), 1, np.float64),
    "small": ((32, 8, 8, 16), 3, np.float32),
    "nhwc-l3": ((32, 16, 16, 256), 3, np.float32),
    "small-f64": ((32, 8, 8, 16), 3, np.float64),
    "nchw-f16": ((64, 64, 56, 56), 1, np.float16),
}
if bfloat16 is not None:
    CASES.update({"nhwc-bf16": ((64, 56, 56, 64), 3, bfloat16),
                  "nchw-bf16": ((64, 64, 56, 56), 1, bfloat16)})

#: Full-size outputs are checked to this error scaled by 1 + |value| (`check_close`):
#: float32/float16/bfloat16 outputs are float64 results rounded once (half an ulp: 6e-8,
#: 5e-4, 4e-3 relative at most).
TOLERANCE = {np.dtype(np.float64): 1e-10, np.dtype(np.float32): 1e-5,
             np.dtype(np.float16): 1e-3}
if bfloat16 is not None:  # 2**-8: half an ulp at the bottom of a binade
    TOLERANCE[np.dtype(bfloat16)] = 5e-3

#: asv's sampling settings for every ``time_*`` benchmark of the suite (each bench module
#: imports them, and asv reads a module's attributes). One process per benchmark and
#: parameter (rounds = 1: asv's default 2 doubles the processes for little: the kernels'
#: run-to-run spread here comes from the machine's load, which a second process a few
#: minutes later samples no better); 5 to 10 samples, stopping after 2 s of samples, after
#: 0.1 s of warm-up. The installed asv re-runs ``setup`` before every sample and times
#: one call per sample when a class has one, so the classes' setups reuse what they built
#: (`memo`): a sample then times the call alone, not a fresh ``out`` page-faulting.
ASV_SETTINGS = dict(rounds=1, repeat=(5, 10, 2.0), warmup_time=0.1)


def memo(cache, key, build):
    """``cache[key]``, built by ``build()`` on first use (asv's per-sample setups)."""
    if key not in cache:
        cache[key] = build()
    return cache[key]


def preimport_frameworks():
    """Import TensorFlow (with Keras) and PyTorch now, where installed.

    asv.conf.json runs the suite with ``launch_method: forkserver``: asv imports the
    benchmark modules once in a server process and forks every benchmark from it, so what
    the modules import at import time is paid once per commit, not per benchmark process
    (TensorFlow takes 5-8 s to import here, and ~150 of the processes used it). Nothing
    here runs an op or a parallel kernel: a forked child must not inherit started
    thread pools.
    """
    if sys.argv[1:2] == ["discover"]:
        # asv's discovery process (`asv_runner ... discover`) only lists the classes:
        # importing the frameworks there cost ~12 s of every commit's ~15 s discovery
        return
    for name in ("tensorflow", "keras", "torch"):
        try:
            __import__(name)
        except ImportError:
            pass


def peak_increase(fn):
    """Bytes by which ``fn()`` raises the process's resident memory at its peak.

    Linux: resets the high-water mark (``/proc/self/clear_refs``, 5), calls ``fn`` and
    reads ``VmHWM`` against the ``VmRSS`` before. The outputs ``fn`` returns count (they
    are alive at the peak); memory the process already had does not, so a forked asv
    process (which starts with its server's interpreter, TensorFlow and PyTorch) reads
    the same as a fresh one. Raises NotImplementedError elsewhere. Changes malloc's
    mmap threshold for the rest of the process (see below): measure last.
    """
    import ctypes
    import gc

    def status(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise NotImplementedError(f"no {field} in /proc/self/status")

    gc.collect()
    try:  # glibc: every block of 1 MiB or more its own mmap, and free memory returned,
        # so a call's arrays are new pages (by default, blocks under 32 MiB come from
        # the heap once a larger one was freed, reusing resident memory: 0 bytes read)
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        before = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise NotImplementedError(f"needs Linux's /proc/self/clear_refs: {exc}") from None
    result = fn()
    peak = status("VmHWM")
    del result
    return max(0, peak - before)


#: `call_peaks` rounds to whole MiB: the last page or two moved between runs of the same
#: code (0 -> 4 KiB, an infinite ratio to asv)
PEAK_STEP = 2 ** 20


def call_peaks(cases, lib=None):
    """``{case: {op: bytes}}``: `peak_increase` of each allocating call (``out=None``)
    of each case, to the nearest MiB, after a warm-up call (anything cached on first use
    is not counted). ``lib``: the numbabn package, as in `numbabn_ops`. In-process: the
    figure counts only what the call itself allocates. With numbabn's output pool off
    (commits that have one): a repeated call would reuse its resident output, and the
    figure is meant to include the outputs, so that a new full-size temporary shows as a
    step of ``x.nbytes`` over them. Raises NotImplementedError where `peak_increase` does.
    Sets malloc's mmap threshold for the rest of the process: measure last."""
    import gc

    lib = lib or nbn
    try:
        pool = importlib.import_module(lib.__name__ + "._pool")
    except ImportError:  # an older commit: no pool
        pool = None
    saved = pool and pool.MIN_BYTES
    # What is alive now is frozen out of the collector's reach, so the full collection
    # before each measurement (`peak_increase`) walks only what is new: ~0.4 s a
    # collection with TensorFlow's and PyTorch's objects around, 28 of them
    gc.collect()
    gc.freeze()
    try:
        if pool:
            pool.MIN_BYTES = float("inf")
        peaks = {}
        for case in cases:
            ops = numbabn_ops(make_inputs(*CASES[case]), None, lib)
            peaks[case] = {}
            for op in ("train", "inference", "backward", "stats"):
                ops[op]()
                peaks[case][op] = PEAK_STEP * round(peak_increase(ops[op]) / PEAK_STEP)
        return peaks
    finally:
        if pool:
            pool.MIN_BYTES = saved
        gc.unfreeze()


#: NUMBABN_BENCH_SMALL=1 (``make bench-check``, run by CI): every benchmark runs once on
#: small inputs, to prove the suite still imports and runs; the case names stay the same.
SMALL_RUN = os.environ.get("NUMBABN_BENCH_SMALL") == "1"
if SMALL_RUN:
    CASES.update({
        "nhwc": ((4, 14, 14, 16), 3, np.float32),
        "nhwc-l3": ((4, 4, 4, 256), 3, np.float32),
        "nchw": ((4, 16, 14, 14), 1, np.float32),
        "nc": ((784, 16), 1, np.float32),
        "nhwc-f16": ((4, 14, 14, 16), 3, np.float16),
        "nc-f64": ((784, 16), 1, np.float64),
        "nchw-f16": ((4, 16, 14, 14), 1, np.float16),
    })
    if bfloat16 is not None:
        CASES.update({"nhwc-bf16": ((4, 14, 14, 16), 3, bfloat16),
                      "nchw-bf16": ((4, 16, 14, 14), 1, bfloat16)})

#: Traffic of each operation in units of ``x.nbytes``: train reads x twice (statistics,
#: then normalize) and writes y; backward reads dy and x twice (sums, then dx) and
#: writes dx; inference reads x and writes y; the statistics read x once.
BYTES_MOVED = {"train": 3, "inference": 2, "backward": 5, "stats": 1, "copy": 2}

_inputs = {}
_references = {}


def make_inputs(shape, axis, dtype):
    """Seeded standard-normal inputs, built once per (shape, axis, dtype) and cached."""
    key = (tuple(shape), axis, np.dtype(dtype).str)
    if key not in _inputs:
        rng = np.random.default_rng(20240601)
        c = shape[axis]
        _inputs[key] = dict(
            x=rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False),
            dy=rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False),
            gamma=rng.uniform(0.5, 1.5, c), beta=rng.standard_normal(c),
            moving_mean=0.1 * rng.standard_normal(c), moving_var=rng.uniform(0.5, 1.5, c),
            axis=axis)
    return _inputs[key]


def save_inputs(inp, folder):
    """Write ``make_inputs``' arrays to ``folder`` (x and dy as unsigned integers of their
    width: ``np.save`` has no bfloat16); `load_inputs` reads them back, bit for bit."""
    x = inp["x"]
    key = f"{'x'.join(map(str, x.shape))}-{inp['axis']}-{np.dtype(x.dtype).name}"
    path = os.path.join(folder, key + ".npz")
    as_uint = np.dtype(f"u{x.itemsize}")
    np.savez(path, **{k: (v.view(as_uint) if k in ("x", "dy") else v)
                      for k, v in inp.items() if k != "axis"})
    return path


def load_inputs(shape, axis, dtype, folder):
    """`make_inputs`, read from what `save_inputs` wrote to ``folder`` when it is there
    (~20 ms for 51 MB, where generating them takes ~0.7 s: asv's setup_cache saves the
    inputs it checked, and each benchmark process loads them)."""
    key = (tuple(shape), axis, np.dtype(dtype).str)
    name = f"{'x'.join(map(str, shape))}-{axis}-{np.dtype(dtype).name}.npz"
    if key not in _inputs and folder and os.path.exists(os.path.join(folder, name)):
        with np.load(os.path.join(folder, name)) as f:
            inp = {k: f[k] for k in f.files}
        for k in ("x", "dy"):
            inp[k] = inp[k].view(dtype)
        inp["axis"] = axis
        _inputs[key] = inp
    return make_inputs(shape, axis, dtype)


class Reference:
    """float64 NumPy results for ``inp``, computed one batch slab (axis 0) at a time.

    Slabs keep the reference's memory small, so a checked setup does not dominate the
    process's peak memory (asv's ``peakmem_*`` report the whole process's high-water
    mark). Per-channel results are attributes; full-size ones come per slab.
    """

    def __init__(self, inp):
        x, axis = inp["x"], inp["axis"]
        if axis == 0:
            raise ValueError("the reference slices the batch along axis 0")
        self.inp, self.red = inp, tuple(a for a in range(x.ndim) if a != axis)
        step = max(1, x.shape[0] // 32)  # float64 temporaries of ~1/32 of x each
        self.slabs = [slice(i, i + step) for i in range(0, x.shape[0], step)]
        self.n = n = x.size // x.shape[axis]
        self.mean = self._sum(self._x) / n
        self.var = self._sum(lambda s: (self._x(s) - self._b(self.mean)) ** 2) / n
        self.invstd = 1.0 / np.sqrt(self.var + EPS)
        self.dbeta = self._sum(self._dy)
        self.dgamma = self._sum(lambda s: self._dy(s) * self._xhat(s))

    def _b(self, v):
        """Per-channel vector ``v`` shaped to broadcast against ``x``."""
        shape = [1] * self.inp["x"].ndim
        shape[self.inp["axis"]] = -1
        return np.asarray(v, dtype=np.float64).reshape(shape)

    def _x(self, s):
        return self.inp["x"][s].astype(np.float64)

    def _dy(self, s):
        return self.inp["dy"][s].astype(np.float64)

    def _sum(self, fn):
        return sum(fn(s).sum(axis=self.red) for s in self.slabs)

    def _xhat(self, s):
        return (self._x(s) - self._b(self.mean)) * self._b(self.invstd)

    def y_train(self, s):
        return self._xhat(s) * self._b(self.inp["gamma"]) + self._b(self.inp["beta"])

    def y_inf(self, s):
        inp, b = self.inp, self._b
        return ((self._x(s) - b(inp["moving_mean"])) / np.sqrt(b(inp["moving_var"]) + EPS)
                * b(inp["gamma"]) + b(inp["beta"]))

    def dx(self, s):
        b = self._b
        return b(self.inp["gamma"] * self.invstd) * (
            self._dy(s) - b(self.dbeta / self.n) - self._xhat(s) * b(self.dgamma / self.n))


def check_close(name, got, want, tol):
    """Raise AssertionError unless |got - want| <= tol * (1 + |want|) everywhere."""
    got = np.asarray(got, dtype=np.float64)
    err = np.abs(got - want) / (1.0 + np.abs(want))
    if not np.all(np.isfinite(got)) or float(err.max(initial=0.0)) > tol:
        raise AssertionError(f"{name}: scaled error {float(np.nanmax(err)):.3g} exceeds "
                             f"{tol:.1g} (or non-finite output)")


def check_full(name, got, want_fn, ref, tol):
    """`check_close` on a full-size result, slab by slab (``want_fn(slab)``)."""
    for s in ref.slabs:
        check_close(name, got[s], want_fn(s), tol)


def numbabn_ops(inp, out, lib=None):
    """Zero-argument callables running each kernel on ``inp``, writing into ``out``.

    ``out=None`` gives the allocating calls. (``out`` also takes the forward output
    computed here for the backward's statistics, to add no full-size allocation.)
    ``lib``: the numbabn package to call (``ab_gate.py`` loads two commits' side by
    side), by default the one imported as ``numbabn``.
    """
    x, dy, g, beta, axis = inp["x"], inp["dy"], inp["gamma"], inp["beta"], inp["axis"]
    mm, mv = inp["moving_mean"], inp["moving_var"]
    lib = lib or nbn
    moments = (batch_moments if lib is nbn else
               importlib.import_module(lib.__name__ + ".stages").batch_moments)
    _, stats = lib.batch_norm_train(x, g, beta, axis, EPS, out=out)
    return {
        "train": lambda: lib.batch_norm_train(x, g, beta, axis, EPS, out=out),
        "inference": lambda: lib.batch_norm_inference(x, g, beta, mm, mv, axis, EPS,
                                                      out=out),
        "backward": lambda: lib.batch_norm_backward(dy, x, g, stats, axis, out=out),
        "stats": lambda: moments(x, axis)[1:],  # (mean, var)
    }


def check_numbabn(inp, ref):
    """Run every kernel once (compiling it) and compare with the float64 reference.

    Raises AssertionError on a wrong result, so a broken kernel is never timed.
    """
    # Statistics and parameter gradients are float64 sums in every dtype.
    tol = TOLERANCE[inp["x"].dtype]
    ops = numbabn_ops(inp, np.empty_like(inp["x"]))
    y, stats = ops["train"]()
    check_full("train y", y, ref.y_train, ref, tol)
    check_close("train mean", stats.mean, ref.mean, 1e-10)
    check_close("train var", stats.var, ref.var, 1e-10)
    check_full("inference y", ops["inference"](), ref.y_inf, ref, tol)
    dx, dgamma, dbeta = ops["backward"]()
    check_full("backward dx", dx, ref.dx, ref, tol)
    check_close("backward dgamma", dgamma, ref.dgamma, 1e-10)
    check_close("backward dbeta", dbeta, ref.dbeta, 1e-10)
    mean, var = ops["stats"]()
    check_close("stats mean", mean, ref.mean, 1e-10)
    check_close("stats var", var, ref.var, 1e-10)


def checked_inputs(shape, axis, dtype):
    """Cached inputs and their `Reference`; numbabn is checked once per process."""
    inp = make_inputs(shape, axis, dtype)
    key = (tuple(shape), axis, np.dtype(dtype).str)
    if key not in _references:
        ref = Reference(inp)
        check_numbabn(inp, ref)
        _references[key] = ref
    return inp, _references[key]


def best_of(fn, repeat=10, min_seconds=0.005):
    """timeit-style: the fastest of ``repeat`` runs, in seconds per call.

    After a warm-up call, calls are looped so that one run lasts ``min_seconds`` (only
    cache-sized inputs need it). ``timeit`` turns the garbage collector off meanwhile.
    """
    timer = timeit.Timer(fn)
    fn()
    number = max(1, int(min_seconds / max(timer.timeit(1), 1e-9)))
    return min(timer.repeat(repeat, number)) / number


@njit(parallel=True, cache=True)
def _parallel_copy(src, dst):
    for i in prange(src.size):
        dst[i] = src[i]


try:  # saves under numbabn's cache lock (numbabn._cache); older commits have none
    from numbabn._cache import lock_saves
except ImportError:
    pass
else:
    lock_saves([_parallel_copy])


def copy_bandwidth(src, dst, repeat=10):
    """Copy bandwidth in bytes/s on these arrays: the faster of NumPy and a Numba copy.

    NumPy copies on one thread; the Numba loop runs on the kernels' threads. Counts a
    read and a write of ``src.nbytes`` (``BYTES_MOVED["copy"]``).
    """
    if not (src.flags.c_contiguous and dst.flags.c_contiguous):
        raise ValueError("copy_bandwidth needs C-contiguous arrays")
    # as unsigned integers of the same width: Numba has no float16
    as_uint = np.dtype(f"u{src.itemsize}")
    s, d = src.reshape(-1).view(as_uint), dst.reshape(-1).view(as_uint)
    t = min(best_of(lambda: np.copyto(d, s), repeat),
            best_of(lambda: _parallel_copy(s, d), repeat))
    return BYTES_MOVED["copy"] * src.nbytes / t


def floor_seconds(op, nbytes, bandwidth):
    """The time ``op`` would take if it only moved its bytes at copy bandwidth."""
    return BYTES_MOVED[op] * nbytes / bandwidth


# ---------------------------------------------------------------- TensorFlow's kernel

def tf_ops(inp):
    """Callables running TF's fused BN (train, inference, backward) on ``inp``.

    Raises NotImplementedError without TensorFlow, or for float64 (the op takes
    half, bfloat16 and float32 only). Inputs become tensors once, so only the op is
    timed; TF allocates its outputs on every call (it has no ``out=``). A 2-D (N, C)
    input runs as NHWC (N, 1, 1, C), the reshape Keras 2 did to fuse dense layers.
    """
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise NotImplementedError(f"tensorflow is not importable: {exc}") from None
    x, dy, axis = inp["x"], inp["dy"], inp["axis"]
    if x.dtype == np.float64:
        raise NotImplementedError("TF's fused BN takes float16/bfloat16/float32 only")
    if x.ndim == 2 and axis == 1:
        x, dy, axis = x[:, None, None, :], dy[:, None, None, :], 3
    if x.ndim != 4 or axis not in (1, 3):
        raise NotImplementedError("TF's fused BN takes 4-D NHWC or NCHW (or 2-D (N, C))")
    # TF's CPU kernel accepts NCHW: it transposes to NHWC and back inside the op
    # (fused_batch_norm_op.cc). That is what a TF user with NCHW data pays, so it is
    # timed as is; no transpose of ours is added or subtracted.
    fmt = "NHWC" if axis == 3 else "NCHW"
    x, dy = tf.constant(x), tf.constant(dy)
    # scale, offset and the statistics are float32 for every x dtype
    g, b, mm, mv = (tf.constant(inp[k].astype(np.float32)) for k in
                    ("gamma", "beta", "moving_mean", "moving_var"))
    empty = tf.constant(np.empty(0, np.float32))
    fused = tf.raw_ops.FusedBatchNormV3

    def train():
        return fused(x=x, scale=g, offset=b, mean=empty, variance=empty, epsilon=EPS,
                     data_format=fmt, is_training=True)

    fwd = train()  # its reserve spaces feed the gradient op
    return {
        "train": train,
        "inference": lambda: fused(x=x, scale=g, offset=b, mean=mm, variance=mv,
                                   epsilon=EPS, data_format=fmt, is_training=False),
        "backward": lambda: tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dy, x=x, scale=g, reserve_space_1=fwd[3], reserve_space_2=fwd[4],
            reserve_space_3=fwd[5], epsilon=EPS, data_format=fmt, is_training=True),
    }


#: unit roundoff of float32, the precision the peers accumulate in
FLOAT32_ROUNDOFF = 2.0 ** -24


def peer_tolerance(dtype, count):
    """The scaled tolerance (`check_close`) of a peer that accumulates in float32.

    A sum of ``count`` float32 terms carries a relative error of up to ``(count - 1) *
    u`` (u = 2**-24; sequential summation's bound, which blocked or vectorized orders
    stay under), and the statistics and gradient sums are such sums, one per channel,
    over ``count`` elements. Each output is then a few float32 operations on them, so
    its error, scaled by ``1 + |value|``, stays within ``count * u`` plus the storage
    dtype's own rounding (``TOLERANCE``). A broken peer is off by O(1), far beyond it
    (at 2e5 elements per channel the bound is 1.2e-2; TensorFlow's backward was
    measured 1.48e-3 off on a Xeon, over the fixed 1e-3 used before).
    """
    return max(TOLERANCE[np.dtype(dtype)], count * FLOAT32_ROUNDOFF)


def check_peer(name, ops, ref, tol=None):
    """Check of a peer's outputs (``tf_ops`` or ``_numpy_bn.numpy_ops``), within the
    peer's own float32 accuracy (`peer_tolerance`) unless ``tol`` is given.

    Each op returns a tuple whose first items are (y, mean) for train, y for inference
    (TF: a tuple), (dx, dgamma, dbeta) for backward.
    """
    x = ref.inp["x"]
    if tol is None:
        tol = peer_tolerance(x.dtype, ref.n)

    def full(a):
        return np.asarray(a).reshape(x.shape)

    def vector(a):
        return np.asarray(a).reshape(-1)

    y = ops["train"]()
    check_full(f"{name} train y", full(y[0]), ref.y_train, ref, tol)
    check_close(f"{name} train mean", vector(y[1]), ref.mean, tol)
    y = ops["inference"]()
    check_full(f"{name} inference y", full(y[0] if isinstance(y, (tuple, list)) else y),
               ref.y_inf, ref, tol)
    g = ops["backward"]()
    check_full(f"{name} backward dx", full(g[0]), ref.dx, ref, tol)
    check_close(f"{name} backward dgamma", vector(g[1]), ref.dgamma, tol)
    check_close(f"{name} backward dbeta", vector(g[2]), ref.dbeta, tol)


def best_of_interleaved(fns, repeat=10, min_seconds=0.02, warm=False):
    """``{name: seconds per call}``, the fastest of ``repeat`` runs of each function.

    Like `best_of`, but the functions take turns run by run, so a change of load on a
    shared machine hits all of them alike and their ratios stay meaningful. Each
    function is called once first (tracing, kernel compilation, first-touch pages)
    unless ``warm`` says every one has been called already (a peer checked just
    before), then once to size its runs (``number`` calls, >= ``min_seconds``); where
    that sizing call is a whole run by itself (a function slower than
    ``min_seconds``: ``number`` is 1), it counts as the first of the ``repeat`` runs.
    The slow peers (NumPy's BN at 51 MB: 0.1-0.4 s a call) cost ``repeat`` calls, not
    ``repeat + 2``.
    """
    timers = {name: timeit.Timer(fn) for name, fn in fns.items()}
    numbers = {}
    best = dict.fromkeys(fns, float("inf"))
    runs = dict.fromkeys(fns, 0)
    for name, timer in timers.items():
        if not warm:
            timer.timeit(1)
        first = timer.timeit(1)
        numbers[name] = max(1, int(min_seconds / max(first, 1e-9)))
        if numbers[name] == 1:
            best[name], runs[name] = first, 1
    for _ in range(repeat):
        for name, timer in timers.items():
            if runs[name] < repeat:
                best[name] = min(best[name], timer.timeit(numbers[name]) / numbers[name])
                runs[name] += 1
    return best


# -------------------------------------------------------------- first-call latency

_FIRST_CALL = """\
import time
t = time.perf_counter()
import numpy as np, numbabn as nbn
x = np.random.default_rng(0).standard_normal((8, 4, 4, 16), dtype=np.float32)
y, stats = nbn.batch_norm_train(x, None, None)
nbn.batch_norm_backward(x, x, None, stats)
print(time.perf_counter() - t)
"""


def first_call_seconds(cache_dir):
    """Seconds a new process takes to import numbabn and run its first train + backward.

    Timed inside the child from before ``import numpy`` (interpreter start-up excluded);
    covers compiling the float32 NHWC kernels, or loading them from ``cache_dir`` (the
    child's NUMBA_CACHE_DIR). The child imports the same numbabn as this process.
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir))
    root = os.path.dirname(os.path.dirname(os.path.abspath(nbn.__file__)))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    res = subprocess.run([sys.executable, "-c", _FIRST_CALL], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"first-call subprocess failed:\n{res.stderr[-3000:]}")
    return float(res.stdout.split()[-1])


def first_call_cold():
    """First call with an empty kernel cache: every kernel it needs compiles."""
    with tempfile.TemporaryDirectory(prefix="numbabn-cold-") as d:
        return first_call_seconds(d)


def first_call_warm(repeat=3):
    """First call with a populated kernel cache (best of ``repeat`` processes)."""
    with tempfile.TemporaryDirectory(prefix="numbabn-warm-") as d:
        first_call_seconds(d)  # populate the cache
        return min(first_call_seconds(d) for _ in range(repeat))


def markdown_table(header, rows):
    """A Markdown table: the first two columns left-aligned, the numbers right-aligned."""
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def settle_compiled_op():
    """Before timing anything that runs numbabn's TensorFlow op: wait until its parallel
    entry points are handed over (with a cold Numba cache they compile in a background
    thread, taking a core, and large inputs run the serial ones until then). Commits
    before the background compile have no ``wait_compiled``: nothing to wait for."""
    from keras_layer import _native

    wait = getattr(_native, "wait_compiled", None)
    if wait is not None:
        wait()
