"""Swap the BatchNormalization layers of a model: to numbabn's, or back to Keras's."""

import keras

from .layer import BatchNormalization

_TARGETS = {"numbabn": BatchNormalization, "keras": keras.layers.BatchNormalization}


def _is_bn(layer):
    return isinstance(layer, keras.layers.BatchNormalization)


def convert(model, to="numbabn"):
    """Return a copy of ``model`` whose BatchNormalization layers are numbabn's or Keras's.

    Every ``keras.layers.BatchNormalization`` (including numbabn's subclass), in nested
    models too, becomes the target class with the same config and weights; every other
    layer is cloned with its weights unchanged. Sequential and functional models are
    supported (through ``keras.models.clone_model(..., recursive=True)``).

    Parameters
    ----------
    model : keras.Model
        A Sequential or functional model.
    to : {"numbabn", "keras"}
        ``"keras"`` is the export path: a model with numbabn layers runs Numba code of
        this process (numbabn's TensorFlow op, or ``tf.numpy_function``) and cannot be
        saved as a TensorFlow SavedModel for serving, the converted one can
        (``model.export(path)``).

    Returns
    -------
    keras.Model
        A new model; ``model`` is not modified.
    """
    if to not in _TARGETS:
        raise ValueError(f"to must be 'numbabn' or 'keras'; got {to!r}")
    target = _TARGETS[to]

    def clone(layer):
        if _is_bn(layer):
            config = layer.get_config()
            config.pop("fused", None)
            return target.from_config(config)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone, recursive=True)
    new.set_weights(model.get_weights())
    return new
