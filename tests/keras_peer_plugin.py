"""pytest plugin for tests/test_keras_peer_suite.py: run Keras's own BatchNormalization
tests, optionally with ``keras_layer.BatchNormalization`` in place of the stock layer, and
write every test's outcome to a JSON file.

Loaded with ``-p keras_peer_plugin`` (tests/ on ``PYTHONPATH``). Environment:

``NUMBABN_PEER_LAYER``
    ``"ours"``: the test module's ``layers.BatchNormalization`` (it does
    ``from keras.src import layers``) and ``keras.layers.BatchNormalization`` become
    ``keras_layer.BatchNormalization`` for the whole session; anything else: the stock
    layer, untouched.
``NUMBABN_PEER_OUTCOMES``
    Path of the JSON file written at the end: ``{test id: "passed" | "failed" |
    "skipped" | "error"}``, plus ``"__layer__"``: the class that the collected test
    module's ``layers.BatchNormalization`` is.
"""

import json
import os

_OUTCOMES = {}
_LAYER = {}


def pytest_configure(config):
    import keras

    stock = keras.layers.BatchNormalization
    if os.environ.get("NUMBABN_PEER_LAYER") == "ours":
        import keras.src.layers

        import keras_layer  # subclasses the stock class: import it before the swap

        ours = keras_layer.BatchNormalization
        assert ours is not stock and issubclass(ours, stock)
        keras.src.layers.BatchNormalization = ours
        keras.layers.BatchNormalization = ours


def pytest_collection_finish(session):
    # the class the collected test module will construct (it names `layers.BatchNormalization`)
    names = set()
    for item in session.items:
        layers = getattr(getattr(item, "module", None), "layers", None)
        layer = getattr(layers, "BatchNormalization", None)
        if layer is not None:
            names.add(f"{layer.__module__}.{layer.__qualname__}")
    _LAYER["name"] = " ".join(sorted(names)) or None


def pytest_runtest_logreport(report):
    nodeid = report.nodeid.split("::", 1)[-1]  # the file's path differs between runs
    if report.when == "call":
        _OUTCOMES[nodeid] = report.outcome
    elif report.outcome == "failed":  # setup or teardown error
        _OUTCOMES[nodeid] = "error"
    elif report.outcome == "skipped":  # skipped at setup
        _OUTCOMES.setdefault(nodeid, "skipped")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("NUMBABN_PEER_OUTCOMES")
    if path:
        with open(path, "w") as f:
            json.dump({"__layer__": _LAYER.get("name"), **_OUTCOMES}, f, indent=1,
                      sort_keys=True)
