"""numbabn's compiled TensorFlow op: build, load, and hand it the Numba entry points.

``numbabn_ops.cc`` defines three CPU ops (``NumbabnTrain``, ``NumbabnInference``,
``NumbabnTrainGrad``) whose kernels call numbabn's Numba-compiled C entry points
(``numbabn._kernels_cpu.c_entry_points``) on buffers TensorFlow allocates, running their
tasks on TensorFlow's intra-op thread pool: no Python, no GIL, no fresh pages and no
second thread pool per call, where ``tf.numpy_function`` has all four (see
``keras_layer/_bridge``).

The library is compiled once per TensorFlow version and source (``make test`` and
``make demo`` build it; otherwise the first use does, ~20 s) with the C++ compiler and
``tf.sysconfig``'s flags, into ``NUMBABN_OP_DIR``, ``~/.cache/numbabn`` or a temporary
folder where that is not writable (``numbabn._native.root``). `load` returns
``None``, and the layer keeps the ``tf.numpy_function`` bridge, with one note saying why,
when the op cannot be used: no compiler, a failed build, or ``NUMBABN_TF_OP=0`` in the
environment.
"""

import ctypes
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

from numbabn import _native as _build

SOURCE = Path(__file__).with_name("numbabn_ops.cc")
#: numbabn's headers for its compiled ops (the buffer pool)
INCLUDE = _build.INCLUDE

_lock = threading.Lock()
_state = {}  # "ops": the loaded module or None; "why": the reason it is None


def _flags():
    import tensorflow as tf

    return (["-shared", "-fPIC", "-O2", "-w", f"-I{INCLUDE}"] + tf.sysconfig.get_compile_flags()
            + tf.sysconfig.get_link_flags())


def library_path():
    """Where the compiled library for this source and TensorFlow lives (built or not)."""
    import tensorflow as tf

    key = hashlib.sha256(SOURCE.read_bytes() + _build.headers_bytes()
                         + tf.__version__.encode()
                         + " ".join(_flags()).encode()).hexdigest()[:16]
    return _build.root() / f"numbabn_tf_ops_{key}.so"


def build(quiet=False):
    """Compile the op library if it is not built yet; return its path.

    Raises
    ------
    RuntimeError
        No C++ compiler, or the compiler failed (its output is in the message).
    """
    return _build.compile_library(SOURCE, library_path(), _flags(), "TensorFlow op", "~20 s",
                                  quiet)


def _register(lib, dtype):
    """Hand ``dtype``'s entry points to the library (``numbabn._native.register``). With a
    cold cache a set takes ~10 s (float32's, with the element-free ones), so only float32
    is registered at load and the others on first use (`ensure`), before any op of theirs
    can run."""
    _build.register(lib.numbabn_set_entry, dtype)
    _state["registered"].add(dtype)


def wait_compiled(timeout=None):
    """True: the entry points are compiled before an op of their dtype can run. (Kept for
    callers of earlier releases, which compiled parallel versions in the background.)"""
    return True


def _load():
    if os.environ.get("NUMBABN_TF_OP", "1") == "0":
        return None, "NUMBABN_TF_OP=0 is set"
    try:
        path = build()
    except (RuntimeError, OSError) as exc:
        return None, f"the op could not be compiled: {exc}"
    import tensorflow as tf

    from numbabn import config

    ops = tf.load_op_library(str(path))
    lib = ctypes.CDLL(str(path))  # the same library: dlopen returns the loaded one
    lib.numbabn_set_serial_below.argtypes = [ctypes.c_int64]
    lib.numbabn_set_serial_below(config.SERIAL_BELOW)
    _state["lib"], _state["registered"] = lib, set()
    _register(lib, "float32")  # graphs restored without tracing (SavedModels) run at once
    return ops, None


def load():
    """The op module (``numbabn_train``, ``numbabn_inference``, ``numbabn_train_grad``),
    or ``None`` where the layer must use the ``tf.numpy_function`` bridge (noted once)."""
    with _lock:
        if "ops" not in _state:
            try:
                _state["ops"], _state["why"] = _load()
            except Exception as exc:  # noqa: BLE001 - any failure means: the Python bridge
                _state["ops"], _state["why"] = None, f"loading it failed: {exc!r}"
            if _state["ops"] is None and os.environ.get("NUMBABN_TF_OP") != "0":
                warnings.warn(f"keras_layer: numbabn's TensorFlow op is not used ("
                              f"{_state['why']}); the layer calls the kernels through "
                              "tf.numpy_function instead, which is slower per call.",
                              RuntimeWarning, stacklevel=3)
        return _state["ops"]


def ensure(dtype):
    """The op module, with ``dtype``'s entry points registered (compiled on first use), or
    ``None`` as `load`. Called where a layer builds an op of that dtype, which is before
    the op can run."""
    ops = load()
    if ops is None:
        return None
    dtype = str(dtype)
    with _lock:
        if dtype not in _state["registered"]:
            _register(_state["lib"], dtype)
    return ops


def status():
    """One line for show_config-style reports: whether the compiled op is in use."""
    ops = load()
    return "compiled op" if ops is not None else f"tf.numpy_function ({_state['why']})"


def main():
    """``python -m keras_layer._native``: build the op ahead of its first use (the
    Makefile does). Without a compiler this says so and exits 0: the layer works
    through tf.numpy_function then."""
    try:
        print(f"numbabn's TensorFlow op: {build(quiet=True)}")
    except (RuntimeError, OSError) as exc:
        print(f"numbabn's TensorFlow op was not built ({exc}); keras_layer will use "
              "tf.numpy_function", file=sys.stderr)
