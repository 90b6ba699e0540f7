"""numbabn's compiled TensorFlow op: build, load, and hand it the Numba entry points.

``numbabn_ops.cc`` defines three CPU ops (``NumbabnTrain``, ``NumbabnInference``,
``NumbabnTrainGrad``) whose kernels call numbabn's Numba-compiled C entry points
(``numbabn._kernels_cpu.c_entry_points``) on buffers TensorFlow allocates: no Python, no
GIL and no fresh pages per call, where ``tf.numpy_function`` has all three (see
``keras_layer/_bridge``).

The library is compiled once per TensorFlow version and source (``make test`` and
``make demo`` build it; otherwise the first use does, ~20 s) with the C++ compiler and
``tf.sysconfig``'s flags, into ``NUMBABN_OP_DIR``, ``~/.cache/numbabn`` or a temporary
folder where that is not writable (`_root`). `load` returns
``None``, and the layer keeps the ``tf.numpy_function`` bridge, with one note saying why,
when the op cannot be used: no compiler, a failed build, ``NUMBABN_TF_OP=0`` in the
environment, or Numba's non-thread-safe ``workqueue`` threading layer (TensorFlow runs
ops from several threads at once, and only the Python bridge can serialize them).
"""

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("numbabn_ops.cc")

#: ``numbabn_set_entry`` slots, in the order of ``enum Slot`` in numbabn_ops.cc.
#: float16 and bfloat16 run the entry points compiled on their bits (uint16, int16).
_OPERATIONS = ("train_float32", "inference_float32", "backward_float32",
               "train_float64", "inference_float64", "backward_float64",
               "train_float16", "inference_float16", "backward_float16",
               "train_bfloat16", "inference_bfloat16", "backward_bfloat16")
_SLOTS = _OPERATIONS + tuple("serial_" + name for name in _OPERATIONS)

_lock = threading.Lock()
_state = {}  # "ops": the loaded module or None; "why": the reason it is None


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _flags():
    import tensorflow as tf

    return (["-shared", "-fPIC", "-O2", "-w"] + tf.sysconfig.get_compile_flags()
            + tf.sysconfig.get_link_flags())


def library_path():
    """Where the compiled library for this source and TensorFlow lives (built or not)."""
    import tensorflow as tf

    key = hashlib.sha256(SOURCE.read_bytes() + tf.__version__.encode()
                         + " ".join(_flags()).encode()).hexdigest()[:16]
    return _root() / f"numbabn_tf_ops_{key}.so"


def _root():
    """``NUMBABN_OP_DIR``, else ``~/.cache/numbabn``, else (not writable) a folder in the
    temporary directory."""
    if os.environ.get("NUMBABN_OP_DIR"):
        return Path(os.environ["NUMBABN_OP_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "numbabn")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        if os.access(cache, os.W_OK):
            return cache
    except OSError:
        pass
    return Path(tempfile.gettempdir(), f"numbabn-{os.getuid()}")


def build(quiet=False):
    """Compile the op library if it is not built yet; return its path.

    Raises
    ------
    RuntimeError
        No C++ compiler, or the compiler failed (its output is in the message).
    """
    path = library_path()
    if path.exists():
        return path
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    if not quiet:
        print(f"numbabn: compiling its TensorFlow op into {path} (once, ~20 s)",
              file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent builds (test workers, asv) never
    # load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, str(SOURCE), "-o", tmp, *_flags()], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _thread_safe_layer():
    """Start Numba's threading layer; return its name if TensorFlow's threads may call
    the parallel kernels concurrently (tbb, omp), else None."""
    import numba

    numba.get_num_threads()  # launches the threading layer
    layer = numba.threading_layer()
    return layer if layer in ("tbb", "omp") else None


#: the entry points each tensor dtype runs: float16 and bfloat16 run those compiled on
#: their bits
_ENTRY_DTYPES = {"float32": "float32", "float64": "float64", "float16": "uint16",
                 "bfloat16": "int16"}


def _register(lib, dtype):
    """Compile (or load from Numba's cache) ``dtype``'s entry points and hand them to the
    library: the serial twins now, the parallel versions in a background thread.

    With a cold cache each set takes ~15 s (a dtype's entry points, ~30 s, were once all
    compiled at load: a fresh `make demo` spent its first epoch compiling). Until the
    parallel set is handed over, the op runs the serial twins for every input (the same
    code and order of sums, so the same bits; only slower on large inputs). So only
    float32 is registered at load and the others on first use (`ensure`), before any op
    of theirs can run. The background thread is not a daemon: a process that ends
    sooner waits for it rather than tearing LLVM down under it."""
    from numbabn import _kernels_cpu

    _hand_over(lib, dtype, _kernels_cpu.c_entry_points(_ENTRY_DTYPES[dtype], parallel=False))
    _state["registered"].add(dtype)

    def parallel():
        try:
            _hand_over(lib, dtype, _kernels_cpu.c_entry_points(_ENTRY_DTYPES[dtype]))
        except Exception as exc:  # noqa: BLE001 - the serial twins keep working
            warnings.warn(f"keras_layer: the parallel {dtype} entry points of numbabn's "
                          f"TensorFlow op failed to compile ({exc!r}); its serial ones "
                          "run every input", RuntimeWarning, stacklevel=1)

    thread = threading.Thread(target=parallel, name=f"numbabn-compile-{dtype}")
    _state["compiling"][dtype] = thread
    thread.start()


def _hand_over(lib, dtype, addresses):
    lib.numbabn_set_entry.argtypes = [ctypes.c_int, ctypes.c_void_p]
    for name, address in addresses.items():
        entry = f"{name}_{dtype}"
        if lib.numbabn_set_entry(_SLOTS.index(entry), address) != 0:
            raise RuntimeError(f"the op library rejected entry point {entry}")


def wait_compiled(timeout=None):
    """Wait until every registered dtype's parallel entry points are handed over (or
    ``timeout`` seconds); whether they all are. Nothing needs it for correct results."""
    threads = list(_state.get("compiling", {}).values())
    for thread in threads:
        thread.join(timeout)
    return not any(thread.is_alive() for thread in threads)


def _load():
    if os.environ.get("NUMBABN_TF_OP", "1") == "0":
        return None, "NUMBABN_TF_OP=0 is set"
    layer = _thread_safe_layer()
    if layer is None:
        return None, ("Numba's threading layer is not thread-safe (install tbb, or make "
                      "OpenMP available)")
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
    _state["lib"], _state["registered"], _state["compiling"] = lib, set(), {}
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
