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
import hashlib
import os
import sys
import threading
import warnings
from pathlib import Path

from ... import _native as _build

SOURCE = Path(__file__).with_name("numbabn_torch.cc")
INCLUDE = _build.INCLUDE

_lock = threading.Lock()
_state = {}  # "op": the operator or None; "why": the reason it is None


def _flags():
    import torch
    from torch.utils import cpp_extension

    lib = Path(torch.__file__).with_name("lib")
    abi = int(torch.compiled_with_cxx11_abi())
    return (["-shared", "-fPIC", "-O2", "-std=c++20", "-w", "-ffp-contract=off", "-fopenmp",
             f"-D_GLIBCXX_USE_CXX11_ABI={abi}", f"-I{INCLUDE}"]
            + [f"-I{p}" for p in cpp_extension.include_paths()]
            + [f"-L{lib}", f"-Wl,-rpath,{lib}", "-lc10", "-ltorch_cpu", "-ltorch"])


def library_path():
    """Where the compiled library for this source and PyTorch lives (built or not)."""
    import torch

    key = hashlib.sha256(SOURCE.read_bytes() + _build.headers_bytes()
                         + torch.__version__.encode() + " ".join(_flags()).encode()
                         ).hexdigest()[:16]
    return _build.root() / f"numbabn_torch_ops_{key}.so"


def build(quiet=False):
    """Compile the op library if it is not built yet; return its path.

    Raises
    ------
    RuntimeError
        No C++ compiler, or the compiler failed (its output is in the message).
    """
    return _build.compile_library(SOURCE, library_path(), _flags(), "PyTorch op", "~1 min",
                                  quiet)


def _register(lib, dtype):
    """Hand ``dtype``'s entry points, the short-run ones too, to the library."""
    _build.register(lib.numbabn_torch_set_entry, dtype, short_runs=True)
    _state["registered"].add(dtype)


def _load():
    if os.environ.get("NUMBABN_TORCH_OP", "1") == "0":
        return None, "NUMBABN_TORCH_OP=0 is set"
    try:
        path = build()
    except (RuntimeError, OSError) as exc:
        return None, f"the op could not be compiled: {exc}"
    import torch

    from numbabn import config

    torch.ops.load_library(str(path))
    lib = ctypes.CDLL(str(path))  # the same library: dlopen returns the loaded one
    lib.numbabn_torch_set_config.argtypes = [ctypes.c_int64, ctypes.c_int64]
    lib.numbabn_torch_set_config(config.SERIAL_BELOW, config.LANES)
    lib.numbabn_torch_pool_cached_bytes.restype = ctypes.c_int64
    _state["lib"], _state["registered"] = lib, set()
    # the Python-level wrapper's __call__ is skipped: its C++ overload is called directly
    return torch.ops.numbabn_native.batch_norm.default._op, None


def load():
    """``torch.ops.numbabn_native.batch_norm`` (its C++ callable), or ``None`` where the
    modules keep the Python path (noted once)."""
    with _lock:
        if "op" not in _state:
            try:
                _state["op"], _state["why"] = _load()
            except Exception as exc:  # noqa: BLE001 - any failure means: the Python path
                _state["op"], _state["why"] = None, f"loading it failed: {exc!r}"
            if _state["op"] is None and os.environ.get("NUMBABN_TORCH_OP") != "0":
                warnings.warn(f"numbabn.torch: the compiled op is not used ({_state['why']});"
                              " the modules call the kernels through Python instead, which "
                              "costs more per call.", RuntimeWarning, stacklevel=3)
        return _state["op"]


def ensure(dtype):
    """The operator with ``dtype``'s entry points registered (a torch dtype name:
    "float32", ...), or ``None`` as `load`."""
    op = load()
    if op is None:
        return None
    with _lock:
        if dtype not in _state["registered"]:
            _register(_state["lib"], dtype)
    return op


def pool_cached_bytes():
    """Bytes of free buffers the op's pool holds (0 when the op is not loaded)."""
    lib = _state.get("lib")
    return 0 if lib is None else lib.numbabn_torch_pool_cached_bytes()


def status():
    """One line: whether the compiled op is in use."""
    return "compiled op" if load() is not None else f"Python path ({_state['why']})"


def main():
    """``python -m numbabn.torch._native``: build the op ahead of its first use (the
    Makefile does). Without a compiler this says so and exits 0."""
    try:
        print(f"numbabn's PyTorch op: {build(quiet=True)}")
    except (RuntimeError, OSError) as exc:
        print(f"numbabn's PyTorch op was not built ({exc}); numbabn.torch will use its "
              "Python path", file=sys.stderr)
