"""Collection rules for the whole repository (pytest runs doctests in numbabn/ too), and
each pytest-xdist worker's own Numba cache."""

import importlib.util
import os

# `make test` runs the suite in pytest-xdist worker processes. Numba's on-disk cache is
# not safe for two processes compiling different signatures of one function at once:
# each rewrites the function's index from what it read before, and both may name the
# same data file, so one signature's entry can end up pointing at the other's machine
# code (numba/numba#10128: segmentation faults in later runs). So each worker compiles
# into a cache of its own, set before anything here imports Numba; its subprocesses
# inherit it. Kept between runs (gitignored), so a second `make test` loads its kernels.
_worker = os.environ.get("PYTEST_XDIST_WORKER")
if _worker:
    os.environ["NUMBA_CACHE_DIR"] = os.path.join(
        os.environ.get("NUMBA_CACHE_DIR")
        or os.path.join(os.path.dirname(os.path.abspath(__file__)), ".numba-test-cache"),
        _worker)

# numbabn.torch imports PyTorch, an optional extra: without it, its doctests are not
# collected (tests/test_torch_*.py skip themselves with pytest.importorskip)
collect_ignore = [] if importlib.util.find_spec("torch") else ["numbabn/torch"]
