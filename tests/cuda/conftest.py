"""GPU tests: under the CUDA simulator (tests/test_cuda_sim.py runs them so), or on a GPU.

The launch configuration is shrunk so that the tiny inputs the simulator can afford
still span several blocks per channel, several threads per block, and stage-2 merges
of several partials. Tests marked ``gpu_hardware`` need a real GPU.
"""

import sys

import pytest
from numba import cuda

from cuda_helpers import SIMULATED, SMALL_LAUNCHES
from numbabn import _device
from numbabn import config as nbn_config


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "gpu_hardware: needs a real CUDA GPU (interop with CuPy/PyTorch, "
        "timing, large inputs); skipped under the simulator")
    if SIMULATED:
        # The simulator runs each CUDA thread as a Python thread, and its block manager
        # polls them in a loop: with the default 5 ms switch interval that loop holds
        # the GIL most of the time (4x slower here). Shorter slices make the simulator's
        # unlocked shared-array allocation race likelier, hence the fix.
        sys.setswitchinterval(1e-4)
        _device.harden_simulator()


def pytest_collection_modifyitems(config, items):
    if SIMULATED:
        reason = "needs a real CUDA GPU: the CUDA simulator is on"
    elif not cuda.is_available():
        reason = "needs a real CUDA GPU: numba.cuda.is_available() is False"
    else:
        return
    for item in items:
        if item.get_closest_marker("gpu_hardware"):
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def small_launches(monkeypatch):
    for name, value in SMALL_LAUNCHES.items():
        monkeypatch.setattr(nbn_config, name, value)
