"""numbabn's kernels save to Numba's on-disk cache under a lock (numbabn/_cache.py).

Numba's cache is not safe for processes saving signatures of one function at once
(numba/numba#10128); several processes compiling numbabn on a fresh install (torch or
Keras multi-worker ranks, pytest-xdist workers) would be exposed."""

import importlib
import importlib.util
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from numbabn import _cache

fcntl = pytest.importorskip("fcntl", reason="the cache lock needs fcntl (POSIX)")


def test_every_cached_function_of_numbabn_saves_under_the_lock():
    import numbabn._kernels_cpu as kernels

    modules = [kernels, importlib.import_module("numbabn._half")]
    if importlib.util.find_spec("torch") is not None:
        modules.append(importlib.import_module("numbabn.torch.modules"))
    objects = [*kernels._SERIAL_NAMESPACE.values()]
    for module in modules:
        objects += list(vars(module).values())
    cached = [f for f in objects if _cache._cache_file(f) is not None]
    assert len(cached) > 100  # the kernels, their serial twins, the half conversions
    unlocked = [f for f in cached
                if not getattr(_cache._cache_file(f).save, "_numbabn_locked", False)]
    assert not unlocked, unlocked


HOLD = """
import fcntl, os, sys
with open(os.path.join(sys.argv[1], sys.argv[2]), "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    print("held", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def test_a_save_waits_while_another_process_holds_the_lock(tmp_path):
    name = f"cached_{uuid.uuid4().hex[:12]}"  # nothing of it in any cache yet
    (tmp_path / f"{name}.py").write_text(
        "from numba import njit\n\n@njit(cache=True)\ndef twice(x):\n    return 2 * x\n")
    sys.path.insert(0, str(tmp_path))
    try:
        module = importlib.import_module(name)
    finally:
        sys.path.remove(str(tmp_path))
    assert _cache.lock_saves([module.twice]) == 1
    folder = _cache.cache_path(module.twice)

    def saved():
        return [f for f in os.listdir(folder) if f.startswith(name) and f.endswith(".nbi")]
    holder = subprocess.Popen([sys.executable, "-c", HOLD, folder, _cache.LOCK_NAME],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = []
        thread = threading.Thread(target=lambda: result.append(module.twice(21)))
        thread.start()
        # compiling this takes well under a second; its save must wait for the holder
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            assert not saved(), "saved while the lock was held"
            time.sleep(0.05)
        assert thread.is_alive()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    thread.join(timeout=60)
    assert result == [42]
    assert saved()  # once the holder let go


def test_the_lock_is_reentrant_in_a_process(tmp_path):
    """A save inside a compile that holds the lock (the C entry points') goes on."""
    with _cache.locked(str(tmp_path)):
        with _cache.locked(str(tmp_path)):
            pass
        assert _cache._depth[str(tmp_path)] == 1
    assert _cache._depth[str(tmp_path)] == 0


def test_a_folder_without_a_lock_file_saves_as_numba_would(tmp_path):
    """If the lock file cannot be made, the save goes on unlocked instead of failing
    the compile (here the "folder" is a file)."""
    not_a_folder = tmp_path / "plain_file"
    not_a_folder.write_text("")
    ran = []
    with _cache.locked(str(not_a_folder)):
        ran.append(True)
    assert ran == [True] and _cache._depth[str(not_a_folder)] == 0


def test_an_unknown_cache_folder_means_no_lock():
    """A Numba whose dispatchers keep their cache elsewhere: `cache_path` is None and the
    C entry points are still created (unlocked), not refused."""
    assert _cache.cache_path(len) is None
    with _cache.locked(None):
        pass
