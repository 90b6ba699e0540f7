"""keras_layer.convert: swap BatchNormalization classes, keep weights and outputs, leave
the original alone; the to="keras" model exports as a SavedModel."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

import keras_layer  # noqa: E402
from keras_helpers import OUT_TOL, assert_close  # noqa: E402

HERE = Path(__file__).parent
TARGET = {"numbabn": kh.OURS, "keras": kh.STOCK}
OTHER = {"numbabn": kh.STOCK, "keras": kh.OURS}


def sequential(bn):
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3),
        bn(momentum=0.5),
        keras.layers.ReLU(),
        keras.layers.Flatten(),
        keras.layers.Dense(5),
        bn(renorm=True, renorm_clipping={"rmax": 2.0}, momentum=0.5, center=False),
        keras.layers.Dense(3),
    ])


def functional(bn):
    """A branch and a merge: two BatchNormalization paths added together."""
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    h = bn(momentum=0.5)(h)
    a = keras.layers.ReLU()(bn(momentum=0.5, scale=False)(h))
    b = bn(axis=-1, momentum=0.5)(keras.layers.Conv2D(4, 1)(h))
    h = keras.layers.Add()([a, b])
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def bn_layers(model):
    return [L for L in model._flatten_layers(include_self=False)
            if isinstance(L, keras.layers.BatchNormalization)]


def trained(build, bn, x):
    keras.utils.set_random_seed(0)
    model = build(bn)
    for _ in range(2):  # moving statistics away from their initial values
        model(x, training=True)
    return model


X = np.random.default_rng(0).standard_normal((5, 6, 6, 2)).astype(np.float32) + 0.5


@pytest.mark.parametrize("to", ["numbabn", "keras"])
@pytest.mark.parametrize("build", [sequential, functional], ids=["sequential", "functional"])
def test_convert_swaps_classes_keeps_weights_and_outputs(build, to):
    model = trained(build, OTHER[to], X)
    before_types = [type(L) for L in model.layers]
    before_weights = [w.copy() for w in model.get_weights()]
    y_before = model(X, training=False).numpy()

    new = keras_layer.convert(model, to=to)

    assert new is not model and type(new) is type(model)
    assert len(bn_layers(new)) == len(bn_layers(model)) >= 2
    for old_layer, new_layer in zip(model.layers, new.layers):
        assert new_layer is not old_layer
        if not isinstance(old_layer, keras.layers.InputLayer):  # clone_model renames those
            assert new_layer.name == old_layer.name
        if isinstance(old_layer, keras.layers.BatchNormalization):
            assert type(new_layer) is TARGET[to]
            expected = old_layer.get_config()
            assert new_layer.get_config() == expected
        else:
            assert type(new_layer) is type(old_layer)
    for a, b in zip(model.get_weights(), new.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert [v.path for v in new.weights] == [v.path for v in model.weights]
    assert_close(new(X, training=False), y_before, OUT_TOL, "inference outputs")

    # the original is untouched: its classes, its weights; and it shares no variable with
    # the new model (training the new one moves only the new one's statistics)
    assert [type(L) for L in model.layers] == before_types
    new(X * 3.0 + 1.0, training=True)
    assert not all(np.array_equal(a, b) for a, b in zip(before_weights, new.get_weights()))
    for a, b in zip(before_weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model(X, training=False).numpy(), y_before)
    # training mode: each class with its own kernels, the same batch statistics
    new.set_weights(model.get_weights())
    assert_close(new(X, training=True), model(X, training=True), OUT_TOL, "training outputs")


@pytest.mark.parametrize("build", [sequential, functional], ids=["sequential", "functional"])
def test_convert_round_trip_restores_classes(build):
    model = trained(build, kh.STOCK, X)
    back = keras_layer.convert(keras_layer.convert(model, to="numbabn"), to="keras")
    assert [type(L) for L in back.layers] == [type(L) for L in model.layers]
    for a, b in zip(model.get_weights(), back.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_convert_reaches_nested_models():
    """Every BatchNormalization becomes the target class, also inside a nested model
    (a pretrained backbone inside a functional model is the usual case)."""
    keras.utils.set_random_seed(0)
    backbone = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3),
                                 kh.STOCK(), keras.layers.ReLU()], name="backbone")
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Flatten()(backbone(inputs))
    model = keras.Model(inputs, kh.STOCK()(keras.layers.Dense(3)(h)))
    new = keras_layer.convert(model, to="numbabn")
    kinds = {L.name: type(L) for L in bn_layers(new)}
    assert len(kinds) == 2
    assert all(k is kh.OURS for k in kinds.values()), kinds
    assert_close(new(X, training=False), model(X, training=False), OUT_TOL, "outputs")


def test_convert_rejects_unknown_target():
    with pytest.raises(ValueError, match="numbabn"):
        keras_layer.convert(sequential(kh.STOCK), to="torch")


@pytest.mark.parametrize("build", [sequential, functional], ids=["sequential", "functional"])
def test_keras_conversion_exports_savedmodel(tmp_path, build):
    ours = trained(build, kh.OURS, X)
    exportable = keras_layer.convert(ours, to="keras")
    path = str(tmp_path / "exported")
    exportable.export(path, verbose=False)
    reloaded = tf.saved_model.load(path)
    served = reloaded.serve(tf.constant(X)).numpy()
    assert_close(served, ours(X, training=False), OUT_TOL, "served vs numbabn inference")
    # a batch of another size through the exported signature (unknown batch size)
    assert reloaded.serve(tf.constant(X[:2])).shape[0] == 2


def _serve_in_fresh_process(path, x):
    """Load a SavedModel in a new Python process (as a serving system would: no
    keras_layer, no Python callbacks of ours) and serve ``x``; (ok, outputs or error)."""
    np.save(Path(path).parent / "x.npy", x)
    script = (
        "import os, sys; os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'\n"
        "import numpy as np, tensorflow as tf\n"
        f"r = tf.saved_model.load({str(path)!r})\n"
        f"x = np.load({str(Path(path).parent / 'x.npy')!r})\n"
        f"np.save({str(Path(path).parent / 'y.npy')!r}, r.serve(tf.constant(x)).numpy())\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"), timeout=300)
    if proc.returncode != 0:
        return False, proc.stderr[-1500:]
    return True, np.load(Path(path).parent / "y.npy")


def test_exported_artifacts_serve_in_a_fresh_process(tmp_path):
    """The converted model's SavedModel serves in a process without keras_layer. Exporting
    the numbabn model itself must not hand out an artifact that only fails at serving
    time: either export() refuses with a clear error, or the artifact serves too."""
    ours = trained(sequential, kh.OURS, X)
    expected = ours(X, training=False).numpy()
    (tmp_path / "keras").mkdir()
    keras_layer.convert(ours, to="keras").export(str(tmp_path / "keras" / "m"), verbose=False)
    ok, served = _serve_in_fresh_process(tmp_path / "keras" / "m", X)
    assert ok, served
    assert_close(served, expected, OUT_TOL, "converted artifact")

    (tmp_path / "ours").mkdir()
    try:
        ours.export(str(tmp_path / "ours" / "m"), verbose=False)
    except Exception as e:  # noqa: BLE001 - any clear refusal will do
        assert "convert" in str(e) or "export" in str(e), e
        return
    ok, served = _serve_in_fresh_process(tmp_path / "ours" / "m", X)
    assert ok, ("model.export() of a keras_layer model succeeded but the artifact fails "
                "to serve in another process:\n" + str(served))
    assert_close(served, expected, OUT_TOL, "numbabn artifact")
