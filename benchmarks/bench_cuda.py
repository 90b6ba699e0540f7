"""asv benchmarks of the CUDA kernels (skipped where no GPU runs them).

* `CudaKernels`: wall time of each operation on GPU arrays, writing into a
  preallocated ``out``, up to the GPU's completion (``cuda.synchronize``): what a caller
  waits for, launch overhead included.
* `CudaBandwidthFloor`: GPU time (CUDA events) over the time the operation's bytes take
  at the device-to-device copy bandwidth measured on the same arrays.
* `CudaVersusCuDNN`: ``torch.nn.functional.batch_norm`` (cuDNN) on the same memory.

Cases are ResNet-50's conv2 activation at batch 256, float32, channels-last and
channels-first, as in ``cuda_report.py``. Every setup checks the kernels against the
float64 NumPy reference first, and raises NotImplementedError (asv: skipped) without
numba-cuda, without a GPU, or under the CUDA simulator. Nothing here imports
``numba.cuda`` at import time: asv imports this module while it discovers benchmarks.
"""

import ctypes.util
import importlib.util
import os

import numpy as np

from ._common import ASV_SETTINGS, BYTES_MOVED, EPS, Reference, make_inputs
from .cuda_report import check, device_ops, gpu_ms, to_device, torch_ops

rounds, repeat, warmup_time = (ASV_SETTINGS[k] for k in ("rounds", "repeat", "warmup_time"))


def gpu_driver_present():
    """Whether an NVIDIA driver is there at all (its device node or libcuda), found
    without importing CUDA. Where not, the benchmarks here are left out of asv's suite
    when it is discovered (see the end of this module): each would otherwise cost asv a
    process that only finds out it cannot run."""
    return os.path.exists("/dev/nvidiactl") or ctypes.util.find_library("cuda") is not None

CASES = {"nhwc": ((256, 56, 56, 64), 3), "nchw": ((256, 64, 56, 56), 1)}
REPEAT = 20

_checked = {}


def _gpu_inputs(case):
    """GPU inputs, their batch statistics and an ``out`` array, checked once per process.

    Raises NotImplementedError where the CUDA kernels cannot run on real hardware.
    """
    if importlib.util.find_spec("numba_cuda") is None:
        raise NotImplementedError("numba-cuda is not installed, so no CUDA kernels (pip install "
                                  "'numbabn[cuda]')")
    from numba import cuda

    from numbabn import _device

    if _device.simulated():
        raise NotImplementedError("the CUDA simulator is on: GPU timings would be meaningless")
    if not cuda.is_available():
        raise NotImplementedError("no CUDA GPU")
    if case not in _checked:
        import numbabn as nbn

        shape, axis = CASES[case]
        host = make_inputs(shape, axis, np.float32)
        d = to_device(host)
        _, stats = nbn.batch_norm_train(d["x"], d["gamma"], d["beta"], axis, EPS)
        check(case, d, stats, Reference(host))  # raises AssertionError if wrong
        _checked[case] = (d, stats, cuda.device_array_like(d["x"]))
    return _checked[case]


class CudaKernels:
    """Time to completion of each operation, ``out=`` preallocated."""

    params = [list(CASES)]
    param_names = ["case"]
    timeout = 600  # the first setup builds and checks 400 MB of inputs

    def setup(self, case):
        from numba import cuda

        d, stats, out = _gpu_inputs(case)
        self.ops, self.sync = device_ops(d, stats, out), cuda.synchronize
        for op in self.ops.values():  # compile outside the timing
            op()
        self.sync()

    def time_train(self, case):
        self.ops["train"]()
        self.sync()

    def time_inference(self, case):
        self.ops["inference"]()
        self.sync()

    def time_backward(self, case):
        self.ops["backward"]()
        self.sync()


class CudaBandwidthFloor:
    """GPU time of each operation / (its bytes at device copy bandwidth); 1.0 = at it."""

    params = [list(CASES)]
    param_names = ["case"]
    timeout = 600

    def setup(self, case):
        d, stats, out = _gpu_inputs(case)
        self.ops, self.x, self.out = device_ops(d, stats, out), d["x"], out

    def _bandwidth(self):
        ms = gpu_ms(lambda: self.out.copy_to_device(self.x), REPEAT)
        return BYTES_MOVED["copy"] * self.x.nbytes / (1e-3 * ms)

    def _ratio(self, op):
        floor_ms = 1e3 * BYTES_MOVED[op] * self.x.nbytes / self._bandwidth()
        return gpu_ms(self.ops[op], REPEAT) / floor_ms

    def track_floor_ratio_train(self, case):
        return self._ratio("train")

    def track_floor_ratio_inference(self, case):
        return self._ratio("inference")

    def track_floor_ratio_backward(self, case):
        return self._ratio("backward")

    def track_copy_bandwidth(self, case):
        return self._bandwidth() / 1e9

    track_floor_ratio_train.unit = "x floor"
    track_floor_ratio_inference.unit = "x floor"
    track_floor_ratio_backward.unit = "x floor"
    track_copy_bandwidth.unit = "GB/s"


class CudaVersusCuDNN:
    """cuDNN's time / numbabn's time per operation (GPU time, CUDA events)."""

    params = [list(CASES)]
    param_names = ["case"]
    timeout = 600

    def setup(self, case):
        d, stats, out = _gpu_inputs(case)
        self.torch = torch_ops(d, d["axis"])
        if self.torch is None:
            raise NotImplementedError("PyTorch with CUDA is not installed")
        self.ops = device_ops(d, stats, out)

    def _speedup(self, op):
        return gpu_ms(self.torch[op], REPEAT) / gpu_ms(self.ops[op], REPEAT)

    def track_speedup_vs_cudnn_train(self, case):
        return self._speedup("train")

    def track_speedup_vs_cudnn_inference(self, case):
        return self._speedup("inference")

    def track_speedup_vs_cudnn_backward(self, case):
        return self._speedup("backward")

    track_speedup_vs_cudnn_train.unit = "x"
    track_speedup_vs_cudnn_inference.unit = "x"
    track_speedup_vs_cudnn_backward.unit = "x"


if not gpu_driver_present():
    # asv's discovery drops methods marked skip_benchmark (what asv_runner's
    # @skip_benchmark does); the classes stay, and setup still says why they cannot run
    for _cls in (CudaKernels, CudaBandwidthFloor, CudaVersusCuDNN):
        for _name in dir(_cls):
            if _name.startswith(("time_", "track_")):
                getattr(_cls, _name).skip_benchmark = True
