"""GPU arrays: recognize them without importing CUDA, and view them through the layouts.

numbabn runs where its full-size arrays live. Any argument with a
``__cuda_array_interface__`` (Numba device arrays, CuPy arrays, PyTorch CUDA tensors)
is a GPU array, and so is the CUDA simulator's ``FakeCUDAArray``, which wraps a NumPy
array and exposes no such interface. Recognizing them needs no import: a simulated
array can only exist once the simulator's module is loaded. ``numba.cuda`` itself is
imported on the first GPU array only, so numbabn imports and runs on the CPU without
numba-cuda, a driver or a GPU.

The layout code (``_layout``) works on NumPy arrays. A GPU array is given to it as a
*shadow*: a NumPy array with the GPU array's shape, dtype and strides over a single
element of host memory, never read. Transposes and reshapes of the shadow only do
stride arithmetic, and the strides they produce describe a view of the GPU array
(starting at the same element), built with ``view``.
"""

import contextlib
import importlib.util
import sys
import threading

import numpy as np

_FAKE_ARRAY_MODULE = "numba.cuda.simulator.cudadrv.devicearray"
_cuda = None       # numba.cuda, once `cuda` has found it usable
_simulated = None  # fixed once numba.cuda is imported
_local = threading.local()  # .stream: the stream of this thread's numbabn GPU work


def current_stream():
    """The Numba stream numbabn's GPU work is queued on: ``0`` (Numba's default stream)
    unless inside `on_stream`."""
    return getattr(_local, "stream", 0)


@contextlib.contextmanager
def on_stream(stream):
    """Queue this thread's numbabn GPU work (launches, allocations, copies) on ``stream``.

    A framework that owns the stream (PyTorch's current stream, wrapped with
    ``numba.cuda.external_stream``) passes it here, so numbabn's kernels are ordered
    with the framework's own work without a synchronize. Nestable; restored on exit.
    """
    previous = current_stream()
    _local.stream = stream
    try:
        yield stream
    finally:
        _local.stream = previous


def is_device_array(a):
    """Whether ``a`` lives on the GPU (CUDA array interface, or a simulated device array)."""
    if a is None or isinstance(a, np.ndarray):
        return False
    try:
        getattr(a, "__cuda_array_interface__")
        return True
    except AttributeError:  # what PyTorch's CPU tensors raise
        pass
    except Exception:  # noqa: BLE001 - e.g. PyTorch won't export a tensor that requires
        return True    # grad: a GPU array all the same, and converting it says why
    fake = sys.modules.get(_FAKE_ARRAY_MODULE)
    return fake is not None and isinstance(a, fake.FakeCUDAArray)


def describe(a):
    """'a GPU array (CuPy ndarray)' or 'a host array (ndarray)', for error messages."""
    where = "a GPU array" if is_device_array(a) else "a host array"
    return f"{where} ({type(a).__module__.split('.')[0]} {type(a).__name__})"


def cuda():
    """``numba.cuda`` (numba-cuda's), imported now; RuntimeError where it cannot run."""
    global _cuda
    if _cuda is not None:  # checked once: this runs on every GPU call
        return _cuda
    if importlib.util.find_spec("numba_cuda") is None:
        raise RuntimeError(
            "numbabn was given a GPU array, but numba-cuda is not installed; install it "
            "with pip install 'numbabn[cuda]' (the numba.cuda built into Numba is "
            "deprecated and not supported)")
    from numba import cuda as module

    if not module.is_available():
        raise RuntimeError("numbabn was given a GPU array, but CUDA is not usable here "
                           "(no driver or no device); see numbabn.show_config()")
    _cuda = module
    return module


def simulated():
    """Whether numba.cuda is the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)."""
    global _simulated
    if _simulated is None:
        if importlib.util.find_spec("numba_cuda") is None:  # Numba's own numba.cuda lacks
            _simulated = False                               # .core; numbabn needs numba-cuda
        else:
            from numba.cuda.core import config

            _simulated = bool(config.ENABLE_CUDASIM)
    return _simulated


def as_device_array(a):
    """A Numba device array for a GPU array (zero-copy; Numba's own arrays as they are).

    Foreign arrays (CuPy, PyTorch) come through their CUDA array interface, which also
    gives NumPy dtypes; an interface that names a stream is synchronized with first.
    """
    if getattr(type(a), "__cuda_ndarray__", False):  # Numba's, or the simulator's
        return a
    return cuda().as_cuda_array(a)


def is_readonly(a):
    interface = getattr(a, "__cuda_array_interface__", None)
    return bool(interface and interface["data"][1])


def data_pointer(a):
    """Address of ``a``'s first element (``a`` as returned by `as_device_array`)."""
    if simulated():
        return a._ary.__array_interface__["data"][0]
    return a.device_ctypes_pointer.value or 0


def extent(a):
    """[first, last) byte addresses ``a`` can touch, from its pointer, shape and strides."""
    lo = hi = data_pointer(a)
    for n, s in zip(a.shape, a.strides):
        if s < 0:
            lo += s * (n - 1)
        else:
            hi += s * (n - 1)
    return lo, hi + a.dtype.itemsize


def may_share_memory(a, b):
    """Bounds-only overlap test, as ``np.may_share_memory``."""
    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def same_view(a, b):
    return (data_pointer(a) == data_pointer(b) and tuple(a.shape) == tuple(b.shape)
            and tuple(a.strides) == tuple(b.strides))


def shadow(a):
    """NumPy stand-in with ``a``'s shape, dtype and strides, for stride arithmetic only."""
    return np.lib.stride_tricks.as_strided(np.zeros(1, a.dtype), tuple(a.shape),
                                           tuple(a.strides), writeable=False)


def view(a, shape, strides):
    """A view of GPU array ``a`` with ``shape`` and byte ``strides``, from its first element.

    The strides come from transposing and reshaping ``shadow(a)``, so the view touches
    only ``a``'s elements. The view keeps ``a`` alive.
    """
    shape, strides = tuple(int(n) for n in shape), tuple(int(s) for s in strides)
    if simulated():
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(np.lib.stride_tricks.as_strided(a._ary, shape, strides))
    interface = dict(shape=shape, strides=strides, typestr=a.dtype.str,
                     data=(data_pointer(a), False), version=3)
    return cuda().from_cuda_array_interface(interface, owner=a, sync=False)


def empty(shape, dtype):
    """A new C-ordered GPU array."""
    return cuda().device_array(tuple(shape), dtype=dtype, stream=current_stream())


def to_device(host):
    return cuda().to_device(np.ascontiguousarray(host), stream=current_stream())


def copy_into(dst, src):
    """``dst[...] = src`` between GPU arrays of one shape, any strides, on the GPU."""
    if simulated():
        dst._ary[...] = src._ary
        return
    # Numba's strided device-to-device assignment
    dst.setitem((slice(None),) * dst.ndim, src, stream=current_stream())


def harden_simulator():
    """Make the CUDA simulator's shared-array allocation thread-safe (numba-cuda 0.30).

    The simulator runs a block's threads as Python threads, and ``cuda.shared.array``
    looks up the block's array for the calling line and creates it if missing, unlocked:
    two threads can both create one, and then write to different arrays (a block
    reduction then loses partial results, about 1 launch in 150 here with a short GIL
    switch interval). numbabn's test and benchmark runs under the simulator call this;
    it changes nothing on a GPU, and nothing unless the simulator is on.
    """
    if not simulated():
        return
    import threading

    from numba.cuda import types
    from numba.cuda.np import numpy_support
    from numba.cuda.simulator import kernelapi

    shared = kernelapi.FakeCUDAShared
    if getattr(shared.array, "_numbabn_locked", False):
        return
    unlocked, lock = shared.array, threading.Lock()

    def array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory: no lookup
            return unlocked(self, shape, dtype, alignment)
        if isinstance(dtype, types.Type):
            dtype = numpy_support.as_dtype(dtype)
        caller = sys._getframe(1)
        key = (caller.f_code.co_filename, caller.f_lineno)  # as the simulator keys them
        with lock:
            found = self._allocations.get(key)
            if found is None:
                found = self._allocations[key] = np.empty(shape, dtype)
        return found

    array._numbabn_locked = True
    shared.array = array
