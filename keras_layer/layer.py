"""``keras_layer.BatchNormalization``: Keras 3's layer with numbabn kernels inside."""

import warnings

import keras
from keras import ops

_FUSED_NOTE_SHOWN = False


def _require_tensorflow():
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "keras_layer.BatchNormalization runs numbabn's NumPy kernels through "
            "TensorFlow and needs the TensorFlow backend; this Keras uses the "
            f"'{keras.backend.backend()}' backend. Set KERAS_BACKEND=tensorflow, or use "
            "keras.layers.BatchNormalization.")


def _in_xla_context():
    """True while tracing a function compiled with XLA (``jit_compile=True``)."""
    import tensorflow as tf
    try:
        from tensorflow.python.ops import control_flow_util
    except ImportError:  # pragma: no cover - private module moved
        return False
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())


@keras.saving.register_keras_serializable(package="numbabn")
class BatchNormalization(keras.layers.BatchNormalization):
    """Drop-in replacement for ``keras.layers.BatchNormalization`` running numbabn kernels.

    Same constructor, weights, ``call`` semantics and config as Keras 3's layer (it is a
    subclass, so ``isinstance(layer, keras.layers.BatchNormalization)`` holds). Forward
    and gradient run numbabn's Numba kernels through ``tf.numpy_function`` and
    ``tf.custom_gradient``: one pass for the statistics, one for the output, two for the
    gradient, with float64 accumulation (accurate for large-mean inputs, where the stock
    layer loses digits) and bitwise-deterministic results.

    Parameters
    ----------
    axis, momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
    moving_mean_initializer, moving_variance_initializer, beta_regularizer,
    gamma_regularizer, beta_constraint, gamma_constraint, renorm, renorm_clipping,
    renorm_momentum, synchronized, **kwargs
        As ``keras.layers.BatchNormalization``.
    fused : bool or None, optional
        Accepted for Keras 2 code and saved configs and ignored (numbabn is always
        fused); a note says so once.

    Notes
    -----
    TensorFlow backend only. Not XLA-compilable (``supports_jit = False``, so Keras's
    ``jit_compile="auto"`` leaves it off); tracing it inside ``jit_compile=True`` raises
    a clear error. A model holding it cannot be exported as a SavedModel for serving:
    ``keras_layer.convert(model, to="keras")`` gives the same model with stock layers.
    """

    def __init__(self, *args, fused=None, **kwargs):
        _require_tensorflow()
        if fused is not None:
            global _FUSED_NOTE_SHOWN
            if not _FUSED_NOTE_SHOWN:
                _FUSED_NOTE_SHOWN = True
                warnings.warn("keras_layer.BatchNormalization: `fused` is accepted for Keras 2 "
                              "compatibility and ignored; numbabn kernels are always fused.",
                              UserWarning, stacklevel=2)
        super().__init__(*args, **kwargs)
        self.supports_jit = False

    def call(self, inputs, training=None, mask=None):
        from . import _bridge

        if _in_xla_context():
            raise ValueError(
                f"Layer '{self.name}' (keras_layer.BatchNormalization) cannot be compiled "
                "with XLA (jit_compile=True): it runs numbabn's NumPy kernels. Compile "
                "without jit_compile, or convert the model with "
                "keras_layer.convert(model, to='keras').")
        if mask is not None:
            self._check_mask(inputs, mask)
            # Masked statistics run in TensorFlow ops (numbabn has no weighted kernel
            # yet), through Keras's own code with the axis handling of `_moments`.
            return super().call(inputs, training=training, mask=mask)

        axis = self.axis % len(inputs.shape)
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        # float16 goes to the kernels as is (they compute in float32); bfloat16 has no
        # NumPy dtype the kernels take, so it is computed in float32 like Keras does.
        kernel_dtype = "float16" if inputs.dtype == "float16" else compute_dtype
        x = ops.cast(inputs, kernel_dtype)
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None

        if training and self.trainable:
            if self.renorm:
                outputs = self._renorm_train(x, gamma, beta, axis)
            else:
                outputs, mean, var = self._train_op(x, gamma, beta, axis)
                self._update_moving(mean, var)
        else:
            outputs = _bridge.inference(x, gamma, beta,
                                        ops.cast(self.moving_mean, compute_dtype),
                                        ops.cast(self.moving_variance, compute_dtype),
                                        axis, self.epsilon)
        return ops.cast(outputs, self.compute_dtype)

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # TensorFlow's SavedModel writer walks every trackable object: stop it here, since
        # the graph's numpy_function ops cannot run outside this Python process.
        if save_type == "savedmodel":
            raise ValueError(
                f"Layer '{self.name}' (keras_layer.BatchNormalization) cannot be exported as "
                "a TensorFlow SavedModel: it runs numbabn's NumPy kernels through "
                "tf.numpy_function, which a served artifact cannot call. Export "
                "keras_layer.convert(model, to='keras') instead: the same model with stock "
                "BatchNormalization layers and the same weights.")
        return super()._trackable_children(save_type, **kwargs)

    def _train_op(self, x, gamma, beta, axis):
        """Batch-statistics normalization; global statistics when synchronized."""
        from . import _bridge

        if self.synchronized:
            import tensorflow as tf

            ctx = tf.distribute.get_replica_context()
            if ctx is not None and ctx.num_replicas_in_sync > 1:
                from . import _sync

                return _sync.train(x, gamma, beta, axis, self.epsilon, ctx)
        return _bridge.train(x, gamma, beta, axis, self.epsilon)

    def _update_moving(self, mean, var):
        # Keras's rule and float32 arithmetic on the variables, fed float64 statistics
        mean = ops.cast(mean, self.moving_mean.dtype)
        var = ops.cast(var, self.moving_variance.dtype)
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
        self.moving_variance.assign(
            self.moving_variance * self.momentum + var * (1.0 - self.momentum))

    def _renorm_train(self, x, gamma, beta, axis):
        """Batch renormalization: ``xhat * (r * gamma) + (d * gamma + beta)``, r, d constant.

        The statistics come from the numbabn kernels; the correction and the moving
        updates reuse Keras's own code, so the maths is the stock layer's.
        """
        _, mean, var = self._train_op(x, None, None, axis)
        mean = ops.cast(mean, "float32")
        var = ops.cast(var, "float32")
        r, d, mean, var = self._renorm_correction_and_moments(mean, var)
        gamma, beta = self._compose_transforms(r, d, gamma, beta, "float32")
        outputs, _, _ = self._train_op(x, gamma, beta, axis)
        self._update_renorm_statistics(mean, var)
        return outputs

    def _check_mask(self, inputs, mask):
        rank = len(inputs.shape)
        axis = self.axis % rank
        expected = tuple(d for a, d in enumerate(inputs.shape) if a != axis)
        got = tuple(mask.shape)
        ok = len(got) == len(expected) and all(
            e is None or g is None or e == g for e, g in zip(expected, got))
        if not ok:
            raise ValueError(
                f"Layer '{self.name}': the mask must have the inputs' shape without the "
                f"channel axis {self.axis}, {expected}; got mask.shape={got} for "
                f"inputs.shape={tuple(inputs.shape)}")

    def _moments(self, inputs, mask):
        """Masked moments as Keras computes them, with the mask expanded at the channel
        axis (Keras expands it at the last axis whatever ``axis`` is)."""
        if mask is None:
            return super()._moments(inputs, mask)
        axis = self.axis % len(inputs.shape)
        weights = ops.cast(ops.broadcast_to(ops.expand_dims(ops.cast(mask, "bool"), axis),
                                            ops.shape(inputs)), inputs.dtype)
        total = ops.sum(weights, self._reduction_axes, keepdims=True) + keras.backend.epsilon()
        mean = ops.sum(inputs * weights, self._reduction_axes, keepdims=True) / total
        variance = ops.sum(ops.square(inputs - mean) * weights, self._reduction_axes,
                           keepdims=True) / total
        channels = inputs.shape[axis]
        return ops.reshape(mean, (channels,)), ops.reshape(variance, (channels,))
