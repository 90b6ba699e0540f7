"""Numba's on-disk kernel cache, made safe for processes that compile at the same time.

Numba saves a compiled signature by reading the function's index file, adding an entry
that names a data file, and writing both back (``IndexDataCacheFile.save``). Two
processes saving different signatures of one function at once can both pick the same
data-file name, and the index can end up pointing one signature at the other's machine
code: a segmentation fault or wrong results in a later process that loads it
(numba/numba#10128, open). It happens where several processes start on a fresh install:
the ranks of ``torch.distributed`` or of Keras's ``MultiWorkerMirroredStrategy`` on one
machine, pytest-xdist workers, a job array. So numbabn's cached functions save under an
exclusive lock (``fcntl.flock``) on one file in their cache folder, and the C entry
points, which compile (and save) as they are created, are created under it. Loading
needs no lock: Numba replaces each file atomically, and an entry whose data file is not
written yet reads as a miss (it compiles). Where ``fcntl`` is missing (Windows), saves
stay as Numba's.
"""

import contextlib
import os

from numba.core.compiler_lock import global_compiler_lock

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".numbabn-cache.lock"


def _cache_file(fn):
    """The ``IndexDataCacheFile`` of a cached Numba dispatcher, else None."""
    return getattr(getattr(fn, "_cache", None), "_cache_file", None)


_depth = {}  # cache folder -> how deep this process holds its lock (see `locked`)


@contextlib.contextmanager
def locked(cache_path):
    """Hold the exclusive lock of the Numba cache folder ``cache_path`` (None: no lock),
    reentrantly.

    Taken under Numba's compiler lock, which every compile and save holds already: so
    one thread of this process at a time gets here, in one lock order (Numba's, then
    this), and a save nested in a compile that holds this lock (the C entry points')
    does not open the file again, whose second ``flock`` would wait for the first."""
    if fcntl is None or cache_path is None:
        yield
        return
    with global_compiler_lock:
        if _depth.get(cache_path, 0):
            _depth[cache_path] += 1
            try:
                yield
            finally:
                _depth[cache_path] -= 1
            return
        try:
            os.makedirs(cache_path, exist_ok=True)
            lock = open(os.path.join(cache_path, LOCK_NAME), "a")
        except OSError:  # a folder Numba writes but this file not: save as Numba would
            lock = None
        try:
            if lock is not None:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                except OSError:  # a file system without locks: save as Numba would
                    pass
            _depth[cache_path] = 1
            yield
        finally:
            _depth[cache_path] = 0
            if lock is not None:
                lock.close()


def cache_path(fn):
    """The cache folder of a cached Numba dispatcher ``fn``; None where this Numba keeps
    it elsewhere (then `locked` does not lock)."""
    return getattr(_cache_file(fn), "_cache_path", None)


def lock_saves(objects):
    """Make every cached Numba dispatcher among ``objects`` (e.g. a module's
    ``globals().values()``) save under its cache folder's lock. Returns how many it
    wrapped."""
    wrapped = 0
    for fn in list(objects):
        cache_file = _cache_file(fn)
        if cache_file is None or getattr(cache_file.save, "_numbabn_locked", False):
            continue
        cache_file.save = _locked_save(cache_file)
        wrapped += 1
    return wrapped


def _locked_save(cache_file):
    save = cache_file.save

    def locked_save(key, data):
        with locked(cache_file._cache_path):
            return save(key, data)

    locked_save._numbabn_locked = True
    return locked_save
