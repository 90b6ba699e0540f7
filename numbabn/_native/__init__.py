"""What numbabn's compiled framework ops share: where they are built and how, and how
they get the Numba entry points.

Shared by the TensorFlow op (``keras_layer._native``) and the PyTorch op
(``numbabn.torch._native``); this folder also holds the C++ headers both include
(``buffer_pool.h``, ``entry_points.h``). Nothing here imports a framework.
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


def register(set_entry, dtype):
    """Compile (or load from Numba's cache) the entry points of ``dtype`` (a framework
    dtype name: "float32", "float64", "float16", "bfloat16"), the short-run ones
    included, and hand each address to ``set_entry(slot, address)``, a library's ctypes
    function (nonzero: refused). With a cold cache float32's set, with the element-free
    ones, took 20.8 s here (18.9 s without the short-run ones); later sets less."""
    from .. import _kernels_cpu

    set_entry.argtypes = [ctypes.c_int, ctypes.c_void_p]
    entries = _kernels_cpu.c_entry_points(_ENTRY_DTYPES[dtype], short_runs=True)
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


def library_path(source, stem, version, flags):
    """Where the library compiled from ``source`` with ``flags`` against a framework of
    ``version`` lives (built or not): ``stem`` and a hash of all of these and numbabn's
    headers, under `root`."""
    key = hashlib.sha256(Path(source).read_bytes() + headers_bytes() + version.encode()
                         + " ".join(flags).encode()).hexdigest()[:16]
    return root() / f"{stem}_{key}.so"


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


class CompiledOp:
    """One compiled op library: built on first use, loaded once, its entry points handed
    over per dtype; where it cannot be used (no compiler, a failed build or load, or
    ``env_var=0``) `load` gives ``None`` and the caller's Python path runs, with one
    ``RuntimeWarning`` saying why (none when switched off).

    ``source``, compiled with ``flags()`` against the framework of ``version()`` (both
    called when needed: the framework is imported then) into `library_path`, named
    ``stem`` and a hash; ``duration``: its build time, for the note.
    ``open_library(path) -> (handle, lib)``: what `load` returns and the ctypes library;
    ``register(lib, dtype)`` hands over a dtype's entry points; ``at_load``: the dtypes
    registered as the library loads; ``who`` / ``fallback`` name the caller and its
    Python path in the notes.
    """

    def __init__(self, name, env_var, source, stem, version, flags, duration, open_library,
                 register, who, fallback, at_load=()):
        self.name, self.env_var, self.who, self.fallback = name, env_var, who, fallback
        self._source, self._stem, self._version, self._flags = source, stem, version, flags
        self._duration = duration
        self._open, self._register, self._at_load = open_library, register, at_load
        self._lock = threading.Lock()
        #: "op": the handle or None, "why": the reason it is None, "lib": the ctypes
        #: library, "registered": the dtypes whose entry points it has
        self.state = {}

    def library_path(self):
        """Where the compiled library lives (built or not)."""
        return library_path(self._source, self._stem, self._version(), self._flags())

    def build(self, quiet=False):
        """Compile the library if it is not built yet; return its path.

        Raises
        ------
        RuntimeError
            No C++ compiler, or the compiler failed (its output is in the message).
        """
        return compile_library(self._source, self.library_path(), self._flags(), self.name,
                               self._duration, quiet)

    def _load(self):
        if os.environ.get(self.env_var, "1") == "0":
            return None, f"{self.env_var}=0 is set"
        try:
            path = self.build()
        except (RuntimeError, OSError) as exc:
            return None, f"the op could not be compiled: {exc}"
        handle, lib = self._open(path)
        self.state["lib"], self.state["registered"] = lib, set()
        for dtype in self._at_load:
            self._register_dtype(dtype)
        return handle, None

    def _register_dtype(self, dtype):
        self._register(self.state["lib"], dtype)
        self.state["registered"].add(dtype)

    def load(self):
        """The op's handle, or ``None`` where the caller must take its Python path."""
        with self._lock:
            if "op" not in self.state:
                try:
                    self.state["op"], self.state["why"] = self._load()
                except Exception as exc:  # noqa: BLE001 - any failure: the Python path
                    self.state["op"], self.state["why"] = None, f"loading it failed: {exc!r}"
                if self.state["op"] is None and os.environ.get(self.env_var) != "0":
                    warnings.warn(f"{self.who}: numbabn's {self.name} is not used "
                                  f"({self.state['why']}); it calls the kernels through "
                                  f"{self.fallback} instead, which is slower per call.",
                                  RuntimeWarning, stacklevel=4)
            return self.state["op"]

    def ensure(self, dtype):
        """`load`'s handle with ``dtype``'s entry points registered (compiled on first
        use), or ``None``."""
        handle = self.load()
        if handle is None:
            return None
        dtype = str(dtype)
        with self._lock:
            if dtype not in self.state["registered"]:
                self._register_dtype(dtype)
        return handle

    def status(self):
        """One line for reports: whether the compiled op is in use."""
        return ("compiled op" if self.load() is not None
                else f"{self.fallback} ({self.state['why']})")

    def main(self):
        """Build the op ahead of its first use (the Makefile does). Without a compiler
        this says so and exits 0: the caller's Python path works then."""
        try:
            print(f"numbabn's {self.name}: {self.build(quiet=True)}")
        except (RuntimeError, OSError) as exc:
            print(f"numbabn's {self.name} was not built ({exc}); {self.who} will use "
                  f"{self.fallback}", file=sys.stderr)
