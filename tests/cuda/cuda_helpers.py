"""Helpers of the GPU tests (a plain module: see tests/cases.py on conftest imports)."""

import numpy as np
from numba import cuda

from numbabn import _device, config

SIMULATED = _device.simulated()

#: What the tests use instead of numbabn.config's defaults: tiny inputs then span
#: several blocks per channel and several threads per block.
SMALL_LAUNCHES = dict(CUDA_THREADS_PER_BLOCK=8, CUDA_MAX_BLOCKS_PER_CHANNEL=4,
                      CUDA_TARGET_BLOCKS=6, CUDA_MIN_ELEMENTS_PER_THREAD=2)
#: numbabn's own values (read before any test shrinks them), for the hardware tests.
DEFAULT_LAUNCHES = {name: getattr(config, name) for name in SMALL_LAUNCHES}


def dev(a):
    """Host array -> GPU array; C or Fortran order kept, other strides made C-ordered."""
    a = np.asarray(a)
    if not (a.flags.c_contiguous or a.flags.f_contiguous):
        a = np.ascontiguousarray(a)
    return cuda.to_device(a)


def host(a):
    return a.copy_to_host()


def transposed(d, axes):
    """A transposed view of GPU array ``d`` (Numba's own transpose is 2-D only)."""
    if SIMULATED:
        return d.transpose(axes)
    interface = dict(d.__cuda_array_interface__)
    strides = interface["strides"] or tuple(d.strides)
    interface.update(shape=tuple(d.shape[a] for a in axes),
                     strides=tuple(strides[a] for a in axes))
    return cuda.from_cuda_array_interface(interface, owner=d)
