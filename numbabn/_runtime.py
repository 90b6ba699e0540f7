"""Threading of the parallel kernels (safety, thread count, waiting), and the config report.

Numba's ``workqueue`` threading layer aborts the interpreter when two threads enter a
parallel region at once, and TensorFlow calls numbabn from its own thread pools. The
``tbb`` and ``omp`` layers are thread-safe, and Numba picks them first when they load
(tbb, then omp, then workqueue). So numbabn runs its kernels freely under tbb or omp
and serializes them with a process-wide lock under workqueue, telling the user once.
The first parallel call always runs under the lock, since the layer is only known
after Numba has started it.

Small inputs run on the calling thread alone (``config.SERIAL_BELOW``): waking a second
thread costs more than it saves there. Their kernels' serial twins do not enter the
thread pool at all, so they run concurrently under any layer. The thread count never changes a result (the work
split comes from the shape), only the time.

OpenMP threads that spin after a kernel steal the cores TensorFlow or BLAS need next (a
1.5x slowdown of the next TensorFlow op, and 100x slower small calls when scikit-learn's
or OpenBLAS's pools spin too, measured here on 2 cores). So unless the user chose
otherwise, numbabn sets ``OMP_WAIT_POLICY=PASSIVE`` at import, before Numba loads its
OpenMP runtime; it cannot take effect if OpenMP was already loaded by another library.
"""

import importlib
import importlib.util
import os
import threading
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numba  # noqa: E402 - after the environment default above
from numba.np.ufunc import parallel as _parallel  # noqa: E402

from . import config  # noqa: E402
from ._kernels_cpu import SERIAL  # noqa: E402

_lock = threading.Lock()
_layer = None
_THREAD_SAFE = ("tbb", "omp")


def run_kernel(kernel, size, *args):
    """Call a parallel ``kernel`` over ``size`` elements safely for the threading layer.

    Below ``config.SERIAL_BELOW`` elements a kernel with a serial twin
    (``_kernels_cpu.SERIAL``) runs the twin: no thread pool, so no lock under any layer.
    A plain function, not a context manager: on small inputs the Python overhead around
    a kernel is most of its cost.
    """
    if size < config.SERIAL_BELOW:
        serial = SERIAL.get(kernel)
        if serial is not None:
            return serial(*args)
    if _layer in _THREAD_SAFE and size >= config.SERIAL_BELOW:
        return kernel(*args)
    if _layer in _THREAD_SAFE:
        return _on_one_thread(kernel, args)
    with _lock:
        if _layer is None:
            numba.get_num_threads()  # start the threading layer before any kernel loads
        result = _on_one_thread(kernel, args) if size < config.SERIAL_BELOW else kernel(*args)
        if _layer is None:
            _resolve_layer()
    return result


def _on_one_thread(kernel, args):
    # Numba's thread count is per calling thread. Its C functions directly: the Python
    # wrappers (numba.get/set_num_threads) check their argument and the layer on every
    # call, several microseconds of a small call. The layer is running here (the first
    # call starts it under the lock).
    previous = _parallel._get_num_threads()
    _parallel._set_num_threads(1)
    try:
        return kernel(*args)
    finally:
        _parallel._set_num_threads(previous)


def _resolve_layer():
    global _layer
    _layer = numba.threading_layer()
    if _layer not in _THREAD_SAFE:
        warnings.warn(
            f"numbabn: Numba's '{_layer}' threading layer is not thread-safe, so "
            "numbabn runs one kernel at a time in this process. Install tbb "
            "(pip install tbb) or make OpenMP available for concurrent calls; "
            "see numbabn.show_config().", RuntimeWarning, stacklevel=4)


def threading_layer():
    """The active Numba threading layer, or ``None`` before the first parallel call."""
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def loadable_threading_layers():
    """The threading layers that can be loaded in this process, in Numba's order."""
    found = []
    for name, module in (("tbb", "tbbpool"), ("omp", "omppool"), ("workqueue", "workqueue")):
        try:
            importlib.import_module(f"numba.np.ufunc.{module}")
        except ImportError:
            continue
        found.append(name)
    return found


def cache_dir():
    """Where Numba caches the compiled kernels."""
    if numba.config.CACHE_DIR:
        return numba.config.CACHE_DIR
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")


def cuda_status():
    """Whether GPU arrays can run here (numba-cuda, a driver and a device, or the simulator)."""
    if importlib.util.find_spec("numba_cuda") is None:
        return "not available (numba-cuda is not installed: pip install 'numbabn[cuda]')"
    try:
        from numba import cuda

        from ._device import simulated

        if simulated():
            return "available: the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)"
        if cuda.is_available():
            name = cuda.get_current_device().name
            return f"available: {name.decode() if isinstance(name, bytes) else name}"
    except Exception as exc:  # noqa: BLE001 - any driver error means "no"
        return f"not available ({exc})"
    return "not available (no CUDA driver or device)"


def config_lines():
    from . import __version__
    import numpy as np

    layer = threading_layer()
    if layer is None:
        layer_text = ("not started yet; the first kernel call picks the first of "
                      f"{loadable_threading_layers()} (Numba's order: tbb, omp, workqueue)")
    else:
        safety = ("thread-safe: concurrent calls run in parallel" if layer in _THREAD_SAFE
                  else "not thread-safe: numbabn serializes its kernel calls")
        layer_text = f"{layer} ({safety})"
    return [
        f"numbabn {__version__} (numba {numba.__version__}, numpy {np.__version__})",
        f"OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY')}",
        f"threading layer: {layer_text}",
        f"threads: {numba.get_num_threads()} of {numba.config.NUMBA_NUM_THREADS} "
        "(numba.set_num_threads / NUMBA_NUM_THREADS; results do not depend on it); "
        f"inputs under {config.SERIAL_BELOW} elements run on 1 thread",
        f"kernel cache: {cache_dir()}",
        f"CUDA: {cuda_status()}",
    ]
