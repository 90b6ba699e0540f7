"""keras_layer: a drop-in ``keras.layers.BatchNormalization`` running numbabn kernels.

``BatchNormalization``
    Keras 3 (TensorFlow backend) layer, same constructor, weights and behaviour as the
    stock layer; forward and gradient run numbabn's Numba kernels.
``convert(model, to="numbabn" | "keras")``
    The same model with its BatchNormalization layers swapped, weights carried over.
"""

from .convert import convert
from .layer import BatchNormalization

__all__ = ["BatchNormalization", "convert"]
