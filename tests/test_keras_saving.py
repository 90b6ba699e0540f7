"""Configs and saved models: get_config/from_config, .keras files loading without
custom_objects, and Keras 2 configs carrying `fused`."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras  # noqa: E402

HERE = Path(__file__).parent


def _full_kwargs():
    return dict(
        axis=1, momentum=0.8, epsilon=1e-4, center=True, scale=False,
        beta_initializer=keras.initializers.RandomNormal(stddev=0.3, seed=7),
        gamma_initializer="ones", moving_mean_initializer="zeros",
        moving_variance_initializer=keras.initializers.Constant(2.0),
        beta_regularizer=keras.regularizers.L2(0.01), gamma_regularizer=None,
        beta_constraint=keras.constraints.MaxNorm(1.0, axis=0), gamma_constraint=None,
        renorm=True, renorm_clipping={"rmax": 3.0, "rmin": 0.3, "dmax": 5.0},
        renorm_momentum=0.9, synchronized=False, name="bn_full")


@pytest.mark.parametrize("kwargs", [dict(name="bn_plain"), "full"], ids=["defaults", "full"])
def test_config_round_trip_and_equal_to_stock(kwargs):
    make = _full_kwargs if kwargs == "full" else (lambda: dict(kwargs))
    ours, stock = kh.OURS(**make()), kh.STOCK(**make())
    config = ours.get_config()
    # the stock layer's config, key for key: a saved model reads the same either way
    assert config == stock.get_config()
    again = kh.OURS.from_config(config)
    assert type(again) is kh.OURS
    assert again.get_config() == config
    # and a stock config builds ours (what convert() and load_model rely on)
    assert kh.OURS.from_config(stock.get_config()).get_config() == config
    # the serialized form names ours, so load_model finds it without custom_objects
    serialized = keras.saving.serialize_keras_object(ours)
    assert serialized["registered_name"] == "numbabn>BatchNormalization"
    assert type(keras.saving.deserialize_keras_object(serialized)) is kh.OURS


def _model():
    inputs = keras.Input((5, 5, 3))
    h = keras.layers.Conv2D(4, 3)(inputs)
    h = kh.OURS(momentum=0.5)(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Flatten()(h)
    h = kh.OURS(renorm=True, renorm_clipping={"dmax": 1.0}, momentum=0.5)(
        keras.layers.Dense(6)(h))
    return keras.Model(inputs, keras.layers.Dense(2)(h))


def test_keras_file_round_trip_without_custom_objects(tmp_path):
    keras.utils.set_random_seed(0)
    model = _model()
    x = np.random.default_rng(0).standard_normal((9, 5, 5, 3)).astype(np.float32)
    for _ in range(2):  # moving statistics away from their initial values
        model(x, training=True)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects
    bns = [L for L in loaded.layers if isinstance(L, keras.layers.BatchNormalization)]
    assert len(bns) == 2 and all(type(L) is kh.OURS for L in bns)
    assert bns[1].renorm and bns[1].renorm_clipping == {"dmax": 1.0}
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    # same class, same weights, deterministic kernels: bitwise equal predictions
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    np.testing.assert_array_equal(loaded(x, training=True).numpy(),
                                  model(x, training=True).numpy())


def _keras2_config():
    """A BatchNormalization config as Keras 2 code produces it: with ``fused``."""
    config = kh.STOCK(momentum=0.9, epsilon=1e-4, name="bn_k2").get_config()
    config["fused"] = True
    return config


def test_fused_config_loads_into_ours_not_into_stock():
    config = _keras2_config()
    with pytest.raises((TypeError, ValueError), match="fused"):
        kh.STOCK.from_config(config)
    with warnings.catch_warnings():
        # the note about `fused` shows once per process (its count: the next test)
        warnings.simplefilter("ignore", UserWarning)
        layer = kh.OURS.from_config(config)
        # the Keras 2 serialized form ({"class_name", "config"}, no module) as well
        legacy = keras.layers.deserialize({"class_name": "BatchNormalization", "config": config},
                                          custom_objects={"BatchNormalization": kh.OURS})
    for L in (layer, legacy):
        assert type(L) is kh.OURS
        assert L.momentum == 0.9 and L.epsilon == 1e-4
        assert "fused" not in L.get_config()  # saved again, it is a Keras 3 config
        x, _ = kh.data((6, 3), 0)
        ref = kh.STOCK(momentum=0.9, epsilon=1e-4)
        kh.assert_close(L(x, training=True), ref(x, training=True), kh.OUT_TOL, "outputs")


def test_fused_warning_shows_once_per_process():
    """In a fresh process (the note is once per process): two layers from a `fused`
    config and one constructed with fused=False give exactly one UserWarning."""
    script = f"""
import os, warnings, json
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import keras, keras_layer
config = json.loads({json.dumps(json.dumps(_keras2_config()))})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    keras_layer.BatchNormalization.from_config(config)
    keras_layer.BatchNormalization.from_config(config)
    keras_layer.BatchNormalization(fused=False)
    keras_layer.BatchNormalization()
notes = [str(w.message) for w in caught
         if issubclass(w.category, UserWarning) and "fused" in str(w.message)]
print(json.dumps(notes))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(notes) == 1, notes
    assert "ignored" in notes[0]
