"""Collection rules for the whole repository (pytest runs doctests in numbabn/ too).

`make test` runs the suite in pytest-xdist worker processes that share numbabn's Numba
cache: numbabn saves to it under a lock (numbabn/_cache.py), since Numba's cache is not
safe for processes saving signatures of one function at once (numba/numba#10128)."""

import importlib.util

# numbabn.torch imports PyTorch, an optional extra: without it, its doctests are not
# collected (tests/test_torch_*.py skip themselves with pytest.importorskip)
collect_ignore = [] if importlib.util.find_spec("torch") else ["numbabn/torch"]
