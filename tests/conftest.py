import importlib.util
import os

import numpy as np
import pytest

from cases import CASES, DTYPES, case_id


def _gpu_tests_run_here():
    """tests/cuda/ runs under the CUDA simulator, or on a real GPU.

    The simulator must be switched on before Numba is imported, so on a machine without
    a GPU test_cuda_sim.py runs tests/cuda/ in a subprocess with NUMBA_ENABLE_CUDASIM=1;
    this process collects it only with the simulator on or a GPU present.
    """
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return True
    if importlib.util.find_spec("numba_cuda") is None:
        return False
    from numba import cuda

    return cuda.is_available()


if not _gpu_tests_run_here():
    collect_ignore = ["cuda"]


@pytest.fixture(params=CASES, ids=case_id)
def case(request):
    return request.param


@pytest.fixture(params=DTYPES, ids=lambda d: np.dtype(d).name)
def dtype(request):
    return np.dtype(request.param)


@pytest.fixture
def numpy_function_bridge():
    """Run the test with keras_layer's tf.numpy_function bridge, as on a machine where
    its compiled TensorFlow op cannot be built (the op is restored afterwards)."""
    from keras_layer import _native

    ops = _native.load()
    _native._state["op"] = None
    yield
    _native._state["op"] = ops
