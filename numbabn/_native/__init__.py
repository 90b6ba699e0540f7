"""Building numbabn's compiled framework ops: where they go and how they are compiled.

Shared by the TensorFlow op (``keras_layer._native``) and the PyTorch op
(``numbabn.torch._native``); this folder also holds the C++ header both include
(``buffer_pool.h``). Nothing here imports a framework.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

#: the folder of numbabn's C++ headers (``-I`` for the ops' builds)
INCLUDE = Path(__file__).parent


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
