"""``python -m keras_layer._native``: build numbabn's TensorFlow op ahead of first use."""

from . import main

main()
