"""Print a Markdown table: numbabn's CUDA kernels against the device copy bandwidth and cuDNN.

Usage (from the repository root, on a machine with a CUDA GPU and numba-cuda)::

    python benchmarks/cuda_report.py [--repeat 20] [--dtypes float32 float16 bfloat16]
    NUMBA_ENABLE_CUDASIM=1 python benchmarks/cuda_report.py --tiny   # anywhere

For ResNet-50's conv2 activation at batch 256, float32, channels-last
(256, 56, 56, 64) and channels-first (256, 64, 56, 56), it checks every kernel against
a float64 NumPy reference, measures the device-to-device copy bandwidth on the same
arrays, then times training forward, inference and backward with CUDA events after a
warm-up (best of ``--repeat``), and ``torch.nn.functional.batch_norm`` (cuDNN) on the
same memory when PyTorch with CUDA is installed. float16 and bfloat16 (``--dtypes``; the
floor counts their 2-byte elements) are read and written by the kernels themselves;
cuDNN gets the same half memory with float32 parameters, as PyTorch's mixed precision.

``--tiny`` runs the same script on a tiny input, to prove it works: under the CUDA
simulator (where events carry no time, so host wall-clock is shown, and the launch
configuration is shrunk so the simulated threads finish in seconds) or on a GPU.
"""

import argparse
import datetime
import os
import sys
import time

if __package__:
    from ._common import (
        BYTES_MOVED, EPS, TOLERANCE, Reference, bfloat16, check_close, check_full, make_inputs,
    )
else:  # run as a script: make the repository root (benchmarks/, numbabn/) importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks._common import (
        BYTES_MOVED, EPS, TOLERANCE, Reference, bfloat16, check_close, check_full, make_inputs,
    )

import numba  # noqa: E402
import numpy as np  # noqa: E402

import numbabn as nbn  # noqa: E402
from numbabn import _device, config  # noqa: E402

# numba.cuda is imported inside the functions: asv imports every module of this package
# while it discovers benchmarks, also where numba-cuda is not installed.

FULL = {"NHWC": ((256, 56, 56, 64), 3), "NCHW": ((256, 64, 56, 56), 1)}
TINY = {"NHWC": ((4, 5, 5, 8), 3), "NCHW": ((4, 8, 5, 5), 1)}
OPS = ("train", "inference", "backward")
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": bfloat16}
HEADER = ("case", "op", "numbabn ms", "floor ms", "x floor", "GB/s",
          "cuDNN ms", "speed-up vs cuDNN")


def gpu_ms(fn, repeat):
    """Best of ``repeat`` timings of ``fn`` in ms, after one warm-up call (compiles).

    CUDA events around the launches on the default stream; the simulator's events
    carry no time, so there host wall-clock (the simulated kernels run synchronously).
    """
    from numba import cuda

    fn()
    cuda.synchronize()
    best = float("inf")
    start, stop = cuda.event(), cuda.event()
    for _ in range(repeat):
        if _device.simulated():
            t = time.perf_counter()
            fn()
            best = min(best, 1e3 * (time.perf_counter() - t))
            continue
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop))
    return best


def torch_ops(arrays, axis):
    """cuDNN's batch norm on the same GPU memory, or None without PyTorch + CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if _device.simulated() or not torch.cuda.is_available():
        return None

    def as_nchw(a):  # zero-copy; NHWC memory becomes torch's channels_last format
        if _is_bfloat16(a.dtype):  # the CUDA array interface cannot name bfloat16: its bits
            t = torch.as_tensor(a.view(np.int16), device="cuda").view(torch.bfloat16)
        else:
            t = torch.as_tensor(a, device="cuda")
        return t.permute(0, 3, 1, 2) if axis == 3 else t

    x, dy = as_nchw(arrays["x"]), as_nchw(arrays["dy"])
    g, b, mm, mv = (torch.as_tensor(arrays[k], device="cuda").float()
                    for k in ("gamma", "beta", "moving_mean", "moving_var"))
    xg = x.detach().requires_grad_()
    gg, bg = g.clone().requires_grad_(), b.clone().requires_grad_()
    y = torch.nn.functional.batch_norm(xg, None, None, gg, bg, training=True, eps=EPS)
    f = torch.nn.functional.batch_norm
    return {
        "train": lambda: f(x, None, None, g, b, training=True, eps=EPS),
        "inference": lambda: f(x, mm, mv, g, b, training=False, eps=EPS),
        "backward": lambda: torch.autograd.grad(y, (xg, gg, bg), dy, retain_graph=True),
    }


def to_device(host):
    """The GPU copies of `make_inputs`'s arrays (same keys)."""
    from numba import cuda

    return {k: cuda.to_device(v) if isinstance(v, np.ndarray) else v
            for k, v in host.items()}


def device_ops(d, stats, out):
    """Zero-argument callables running each operation on GPU inputs ``d``.

    With ``out`` they write into it (what is timed); with None they allocate.
    """
    x, g, b, axis = d["x"], d["gamma"], d["beta"], d["axis"]
    return {
        "train": lambda: nbn.batch_norm_train(x, g, b, axis, EPS, out=out),
        "inference": lambda: nbn.batch_norm_inference(
            x, g, b, d["moving_mean"], d["moving_var"], axis, EPS, out=out),
        "backward": lambda: nbn.batch_norm_backward(d["dy"], x, g, stats, axis, out=out),
    }


def _is_bfloat16(dtype):
    return bfloat16 is not None and np.dtype(dtype) == np.dtype(bfloat16)


def check(name, d, stats, ref):
    """Raise AssertionError unless every kernel matches the float64 reference (full-size
    results to the dtype's rounding, `TOLERANCE`; float64 sums to 1e-10)."""
    tol = TOLERANCE[np.dtype(d["x"].dtype)]
    calls = device_ops(d, stats, None)
    y, stats = calls["train"]()
    check_full(f"{name} train y", y.copy_to_host(), ref.y_train, ref, tol)
    check_close(f"{name} train mean", stats.mean.copy_to_host(), ref.mean, 1e-10)
    check_close(f"{name} train var", stats.var.copy_to_host(), ref.var, 1e-10)
    check_full(f"{name} inference y", calls["inference"]().copy_to_host(), ref.y_inf,
               ref, tol)
    dx, dgamma, dbeta = calls["backward"]()
    check_full(f"{name} backward dx", dx.copy_to_host(), ref.dx, ref, tol)
    check_close(f"{name} backward dgamma", dgamma.copy_to_host(), ref.dgamma, 1e-10)
    check_close(f"{name} backward dbeta", dbeta.copy_to_host(), ref.dbeta, 1e-10)


def measure(name, shape, axis, repeat, dtype=np.float32):
    """Check, then time one case: (copy bandwidth in B/s, table rows, cuDNN timed?)."""
    from numba import cuda

    host = make_inputs(shape, axis, dtype)
    d = to_device(host)
    _, stats = nbn.batch_norm_train(d["x"], d["gamma"], d["beta"], axis, EPS)
    check(name, d, stats, Reference(host))
    out = cuda.device_array_like(d["x"])
    ops = device_ops(d, stats, out)

    nbytes = host["x"].nbytes
    # the copy as 16-bit integers for the half formats (the simulator's copy refuses
    # bfloat16's void dtype; on a GPU it is the same bytes either way)
    as_bits = (lambda a: a.view(np.int16)) if host["x"].itemsize == 2 else (lambda a: a)
    src, dst = as_bits(d["x"]), as_bits(out)
    bandwidth = BYTES_MOVED["copy"] * nbytes / (1e-3 * gpu_ms(
        lambda: dst.copy_to_device(src), repeat))
    torch = torch_ops(d, axis)
    rows = []
    for op in OPS:
        ms = gpu_ms(ops[op], repeat)
        floor = 1e3 * BYTES_MOVED[op] * nbytes / bandwidth
        ref_ms = gpu_ms(torch[op], repeat) if torch else None
        label = f"{name} {shape}, axis {axis}, {np.dtype(dtype).name}"
        rows.append((label if op == "train" else "", op,
                     f"{ms:.3f}", f"{floor:.3f}", f"{ms / floor:.2f}",
                     f"{BYTES_MOVED[op] * nbytes / (1e-3 * ms) / 1e9:.0f}",
                     f"{ref_ms:.3f}" if ref_ms else "", f"{ref_ms / ms:.2f}x" if ref_ms else ""))
    return bandwidth, rows, torch is not None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="tiny inputs: prove the script works (e.g. under the simulator)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed runs per operation (default 20; 2 with --tiny)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "float16", "bfloat16"],
                        choices=list(DTYPES), help="element types (default: all three; "
                        "bfloat16 needs ml_dtypes)")
    args = parser.parse_args(argv)
    repeat = args.repeat or (2 if args.tiny else 20)
    dtypes = [DTYPES[name] for name in args.dtypes if DTYPES[name] is not None]
    from numba import cuda

    if not cuda.is_available():
        sys.exit("no CUDA GPU here; run under the simulator with NUMBA_ENABLE_CUDASIM=1 "
                 "and --tiny")
    if _device.simulated():
        _device.harden_simulator()
        sys.setswitchinterval(1e-4)  # the simulator's block manager polls its threads
        config.CUDA_THREADS_PER_BLOCK = 32  # tens of Python threads per block, not 256
    device = ("CUDA simulator (timings are host wall-clock, meaningless)"
              if _device.simulated() else cuda.get_current_device().name)
    if isinstance(device, bytes):
        device = device.decode()

    bandwidths, table, with_torch = {}, [], False
    for dtype in dtypes:
        for name, (shape, axis) in (TINY if args.tiny else FULL).items():
            key = f"{name} {np.dtype(dtype).name}"
            bandwidths[key], rows, torch_here = measure(name, shape, axis, repeat, dtype)
            table += rows
            with_torch |= torch_here

    timer = "host wall-clock" if _device.simulated() else "CUDA events"
    print(f"GPU: {device}; numba {numba.__version__}, numbabn {nbn.__version__}, "
          f"{datetime.date.today()}; best of {repeat} after a warm-up, {timer}")
    print("Device copy bandwidth in the same run: " + ", ".join(
        f"{bw / 1e9:.0f} GB/s ({name} arrays)" for name, bw in bandwidths.items()))
    print()
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(HEADER) - 2)) + "|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print()
    print("- floor = bytes that must move / device copy bandwidth: train 2 reads + 1 write "
          "of x, inference 1 + 1, backward 4 + 1 (kernels write into a preallocated out=), "
          "in the dtype's own element size.")
    print("- all kernels were checked against a float64 NumPy reference first.")
    if not with_torch:
        print("- cuDNN not timed: PyTorch with CUDA is not installed"
              + (" (or this is the simulator)" if _device.simulated() else "") + ".")
    else:
        print("- cuDNN = torch.nn.functional.batch_norm on the same memory (NHWC as "
              "channels_last), allocating its outputs; backward through autograd.")


if __name__ == "__main__":
    main()
