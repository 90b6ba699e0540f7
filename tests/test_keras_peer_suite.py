"""Keras's own BatchNormalization tests (shipped in the Keras wheel) on our layer.

The installed Keras's ``keras/src/layers/normalization/batch_normalization_test.py`` runs
twice, each in its own pytest subprocess: as shipped (the stock layer), and with
``keras_layer.BatchNormalization`` substituted for the names the module uses
(tests/keras_peer_plugin.py). Every test id the stock layer passes here must pass with
ours: the bar is what the stock layer passes in this environment (a case that needs
something not installed fails or skips for both), compared by id, not by count.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

HERE = Path(__file__).parent
PEER_MODULE = "keras.src.layers.normalization.batch_normalization_test"


def _peer_file():
    try:
        spec = importlib.util.find_spec(PEER_MODULE)
    except ImportError:
        spec = None
    if spec is None or spec.origin is None:
        pytest.skip(f"this Keras wheel does not ship {PEER_MODULE}")
    return spec.origin


def _run_suite(layer, test_file, workdir):
    """pytest on ``test_file`` in a subprocess; ({test id: outcome}, output tail)."""
    workdir.mkdir()
    outcomes = workdir / "outcomes.json"
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join(p for p in [str(HERE), str(HERE.parent),
                                                      os.environ.get("PYTHONPATH", "")] if p),
               NUMBABN_PEER_LAYER=layer, NUMBABN_PEER_OUTCOMES=str(outcomes),
               KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
    cmd = [sys.executable, "-m", "pytest", test_file, "-q", "-rfE", "-p", "no:cacheprovider",
           "-p", "keras_peer_plugin", "-c", os.devnull, "--rootdir", str(workdir),
           "-W", "ignore::DeprecationWarning"]
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True,
                          timeout=600)
    tail = (proc.stdout + proc.stderr)[-6000:]
    assert outcomes.exists(), f"the {layer} run wrote no outcomes:\n{tail}"
    result = json.loads(outcomes.read_text())
    return result.pop("__layer__"), result, tail


def test_keras_own_batch_normalization_tests_pass_on_ours(tmp_path):
    test_file = _peer_file()
    start = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:  # the two runs at once (subprocesses)
        stock_run, ours_run = (pool.submit(_run_suite, layer, test_file, tmp_path / layer)
                               for layer in ("stock", "ours"))
        stock_layer, stock, stock_tail = stock_run.result()
        ours_layer, ours, ours_tail = ours_run.result()
    seconds = time.perf_counter() - start

    stock_passed = {t for t, o in stock.items() if o == "passed"}
    ours_passed = {t for t, o in ours.items() if o == "passed"}
    # the test extra installs all the module needs: a stock layer passing nothing means the
    # harness is broken, which must not pass as a skip
    assert stock_passed, f"the stock layer passes none of Keras's tests here:\n{stock_tail}"
    # the tests constructed the layer each run was meant to test
    assert stock_layer == "keras.src.layers.normalization.batch_normalization.BatchNormalization"
    assert ours_layer == "keras_layer.layer.BatchNormalization", (ours_layer, ours_tail)
    assert set(ours) == set(stock), "the two runs collected different tests"
    both = len(stock_passed & ours_passed)
    print(f"\nKeras's {len(stock)} BatchNormalization tests ({seconds:.0f} s): stock passes "
          f"{len(stock_passed)}, ours {len(ours_passed)} ({both} of the stock's)")
    lost = sorted(stock_passed - ours_passed)
    assert not lost, (
        f"{len(lost)} of the {len(stock_passed)} Keras tests the stock layer passes fail with "
        f"keras_layer.BatchNormalization: {lost}\n\n{ours_tail}")
