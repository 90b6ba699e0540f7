"""numbabn's compiled PyTorch op: build, load, and hand it the Numba entry points.

``numbabn_torch.cc`` defines ``torch.ops.numbabn_native.batch_norm``, the modules' whole
eager CPU forward (statistics, running-statistics update, output) with a C++ autograd
node for the backward, computed by numbabn's Numba-compiled C entry points
(``numbabn._kernels_cpu.c_entry_points``) on PyTorch's thread pool: one crossing from
Python per module call, where the Python path (``numbabn.torch._ops``) makes ~100 calls.

The library is compiled once per PyTorch version and source (``make test``,
``make demo-torch`` and ``make bench`` build it; otherwise the first module call does,
~1 min) with the C++ compiler against the headers PyTorch ships, into
``NUMBABN_OP_DIR``, ``~/.cache/numbabn`` or a temporary folder (as the TensorFlow op,
``keras_layer._native``). `load` returns ``None``, and the modules keep the Python path,
with one note saying why, when the op cannot be used: no compiler, a failed build, or
``NUMBABN_TORCH_OP=0`` in the environment.
"""

import ctypes
from pathlib import Path

from ... import _native as _build

SOURCE = Path(__file__).with_name("numbabn_torch.cc")
INCLUDE = _build.INCLUDE


def _flags():
    import torch
    from torch.utils import cpp_extension

    lib = Path(torch.__file__).with_name("lib")
    abi = int(torch.compiled_with_cxx11_abi())
    return (["-shared", "-fPIC", "-O2", "-std=c++20", "-w", "-ffp-contract=off", "-fopenmp",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{INCLUDE}"]
            + [f"-I{p}" for p in cpp_extension.include_paths()]
            + [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"])


def _version():
    import torch

    return torch.__version__


def _register(lib, dtype):
    _build.register(lib.numbabn_torch_set_entry, dtype)


def _open(path):
    import torch

    from numbabn import config

    torch.ops.load_library(str(path))
    lib = ctypes.CDLL(str(path))  # the same library: dlopen returns the loaded one
    lib.numbabn_torch_set_config.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.numbabn_torch_set_config(config.TORCH_SERIAL_BELOW, config.LANES)
    lib.numbabn_torch_pool_cached_bytes.restype = ctypes.c_int64
    # the op's C++ overload, called directly: the Python wrapper's __call__ is skipped
    return torch.ops.numbabn_native.batch_norm.default._op, lib


_op = _build.CompiledOp("PyTorch op", "NUMBABN_TORCH_OP", SOURCE, "numbabn_torch_ops", _version,
                        _flags, "~1 min", _open, _register,
                        who="numbabn.torch", fallback="the Python path")
_state = _op.state
#: where the compiled library lives (built or not); compile it if it is not built yet
library_path, build = _op.library_path, _op.build

#: ``torch.ops.numbabn_native.batch_norm`` (its C++ callable), or ``None`` where the
#: modules keep the Python path (noted once)
load = _op.load
#: the op with a dtype's entry points registered (a torch dtype name: "float32", ...)
ensure = _op.ensure
status = _op.status
#: ``python -m numbabn.torch._native``
main = _op.main


def pool_cached_bytes():
    """Bytes of free buffers the op's pool holds (0 when the op is not loaded)."""
    lib = _state.get("lib")
    return 0 if lib is None else lib.numbabn_torch_pool_cached_bytes()
