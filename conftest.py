"""Collection rules for the whole repository (pytest runs doctests in numbabn/ too)."""

import importlib.util

# numbabn.torch imports PyTorch, an optional extra: without it, its doctests are not
# collected (tests/test_torch_*.py skip themselves with pytest.importorskip)
collect_ignore = [] if importlib.util.find_spec("torch") else ["numbabn/torch"]
