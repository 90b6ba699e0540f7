"""What numbabn's compiled framework ops share: where they are built and how, and how
they get the Numba entry points.

Shared by the TensorFlow op (``keras_layer._native``) and the PyTorch op
(``numbabn.torch._native``); this folder also holds the C++ headers both include
(``buffer_pool.h``, ``entry_points.h``). Nothing here imports a framework.
"""

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: the folder of numbabn's C++ headers (``-I`` for the ops' builds)
INCLUDE = Path(__file__).parent
#: the headers, whose bytes go into the ops' library names (a change rebuilds them)
HEADERS = ("buffer_pool.h", "entry_points.h")

#: the entry points' slots, in the order of ``enum Slot`` and ``ElementEntry`` in
#: entry_points.h: the element-free entry points, then each element type's
_COMMON = ("plan", "train_coeffs", "norm_coeffs", "grad_coeffs")
_PER_ELEMENT = ("stats", "affine", "grad_sums", "grad_input", "stats_short", "grad_sums_short")
SLOTS = _COMMON + tuple(f"{name}_{dtype}" for dtype in ("float32", "float64", "float16",
                                                        "bfloat16") for name in _PER_ELEMENT)
#: the entry points each tensor dtype runs: float16 and bfloat16 run those compiled on
#: their bits
_ENTRY_DTYPES = {"float32": "float32", "float64": "float64", "float16": "uint16",
                 "bfloat16": "int16"}


def headers_bytes():
    """The headers' contents, for the ops' library names."""
    return b"".join((INCLUDE / name).read_bytes() for name in HEADERS)


def register(set_entry, dtype, short_runs=False):
    """Compile (or load from Numba's cache) the entry points of ``dtype`` (a framework
    dtype name: "float32", "float64", "float16", "bfloat16"), with the short-run ones
    when ``short_runs``, and hand each address to ``set_entry(slot, address)``, a
    library's ctypes function (nonzero: refused). A dtype's set takes ~10 s to compile
    with a cold cache."""
    from .. import _kernels_cpu

    set_entry.argtypes = [ctypes.c_int, ctypes.c_void_p]
    entries = _kernels_cpu.c_entry_points(_ENTRY_DTYPES[dtype], short_runs=short_runs)
    for name, address in entries.items():
        slot = name if name in _COMMON else f"{name}_{dtype}"
        if set_entry(SLOTS.index(slot), address) != 0:
            raise RuntimeError(f"the op library rejected entry point {slot}")


def compiler():
    """The C++ compiler: ``CXX``, else ``c++`` or ``g++`` on the PATH (None: none)."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def root():
    """Where compiled ops go: ``NUMBABN_OP_DIR``, else ``~/.cache/numbabn``, else (not
    writable) a folder in the temporary directory."""
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


def compile_library(source, path, flags, what, duration, quiet=False):
    """Compile ``source`` into the shared library ``path`` unless it exists; return it.

    ``what`` and ``duration`` name the op and its build time in the one-line note.

    Raises
    ------
    RuntimeError
        No C++ compiler, or the compiler failed (its output is in the message).
    """
    path = Path(path)
    if path.exists():
        return path
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
    if not quiet:
        print(f"numbabn: compiling its {what} into {path} (once, {duration})", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Compile to a temporary name and rename: concurrent builds (test workers, asv) never
    # load a half-written library.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, str(source), "-o", tmp, *flags], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{cxx} failed:\n{proc.stderr[-4000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
