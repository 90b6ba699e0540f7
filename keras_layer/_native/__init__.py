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
from pathlib import Path

from numbabn import _native as _build

SOURCE = Path(__file__).with_name("numbabn_ops.cc")
#: numbabn's headers for its compiled ops (the buffer pool)
INCLUDE = _build.INCLUDE

def _flags():
    import tensorflow as tf

    return (["-shared", "-fPIC", "-O2", "-w", f"-I{INCLUDE}"] + tf.sysconfig.get_compile_flags()
            + tf.sysconfig.get_link_flags())


def _version():
    import tensorflow as tf

    return tf.__version__


def _register(lib, dtype):
    # float32's at load (graphs restored without tracing, SavedModels, run at once); the
    # others on first use (`ensure`), before any op of theirs can run: ~10 s each cold
    _build.register(lib.numbabn_set_entry, dtype)


def _open(path):
    import tensorflow as tf

    from numbabn import config

    ops = tf.load_op_library(str(path))
    lib = ctypes.CDLL(str(path))  # the same library: dlopen returns the loaded one
    lib.numbabn_set_serial_below.argtypes = [ctypes.c_int64]
    lib.numbabn_set_serial_below(config.SERIAL_BELOW)
    lib.numbabn_set_lanes.argtypes = [ctypes.c_int64]
    lib.numbabn_set_lanes(config.LANES)
    return ops, lib


def wait_compiled(timeout=None):
    """True: the entry points are compiled before an op of their dtype can run. (Kept for
    callers of earlier releases, which compiled parallel versions in the background.)"""
    return True


_op = _build.CompiledOp("TensorFlow op", "NUMBABN_TF_OP", SOURCE, "numbabn_tf_ops", _version,
                        _flags, "~20 s", _open, _register,
                        who="keras_layer", fallback="tf.numpy_function", at_load=("float32",))
_state = _op.state
#: where the compiled library lives (built or not); compile it if it is not built yet
library_path, build = _op.library_path, _op.build

#: the op module (``numbabn_train``, ``numbabn_inference``, ``numbabn_train_grad``), or
#: ``None`` where the layer must use the ``tf.numpy_function`` bridge (noted once)
load = _op.load
#: the op module with a dtype's entry points registered (compiled on first use), or
#: ``None``; called where a layer builds an op of that dtype, before the op can run
ensure = _op.ensure
status = _op.status
#: ``python -m keras_layer._native``
main = _op.main
