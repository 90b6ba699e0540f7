"""``keras_layer.BatchNormalization``: Keras 3's layer with numbabn kernels inside."""

import inspect
import warnings

import keras
from keras import ops

_FUSED_NOTE_SHOWN = False

_STOCK = keras.layers.BatchNormalization


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


def _init_signature(stock_init, own_init):
    """The stock ``__init__``'s signature plus ``fused=None`` (keyword-only, before
    ``**kwargs``): what ``own_init(self, *args, fused=None, **kwargs)`` accepts, since
    it hands ``*args`` and ``**kwargs`` on to the stock ``__init__``."""
    params = list(inspect.signature(stock_init).parameters.values())
    if "fused" not in (p.name for p in params):
        fused = inspect.signature(own_init).parameters["fused"]
        at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
        params.insert(at, fused)
    return inspect.Signature(params)


class _ClassOnlySignature:
    """``inspect.signature(BatchNormalization)`` is the constructor's; an instance has
    none of its own (its signature stays its ``__call__``'s, as for the stock layer)."""

    def __init__(self, signature):
        self.signature = signature

    def __get__(self, obj, objtype=None):
        if obj is not None:
            raise AttributeError("__signature__")
        return self.signature


@keras.saving.register_keras_serializable(package="numbabn")
class BatchNormalization(_STOCK):
    """Drop-in replacement for ``keras.layers.BatchNormalization`` running numbabn kernels.

    Same constructor, weights, ``call`` semantics and config as Keras 3's layer (it is a
    subclass, so ``isinstance(layer, keras.layers.BatchNormalization)`` holds). Forward
    and gradient run numbabn's Numba kernels inside a compiled TensorFlow op (or, where
    it cannot be built, through ``tf.numpy_function``; see
    ``keras_layer._bridge``) and ``tf.custom_gradient``: one pass for the statistics,
    one for the output, two for the gradient, with float64 accumulation (accurate for
    large-mean inputs, where the stock layer loses digits) and bitwise-deterministic
    results. Inference right after a convolution runs TensorFlow's fused op instead,
    which grappler folds into the convolution.

    Parameters
    ----------
    axis, momentum, epsilon, center, scale, beta_initializer, gamma_initializer,
    moving_mean_initializer, moving_variance_initializer, beta_regularizer,
    gamma_regularizer, beta_constraint, gamma_constraint, renorm, renorm_clipping,
    renorm_momentum, synchronized, **kwargs
        As ``keras.layers.BatchNormalization`` (positionally too); the signature is the
        installed Keras's, read when this module is imported.
    fused : bool or None, optional
        Accepted for Keras 2 code and saved configs and ignored (numbabn is always
        fused); a note says so once.

    Notes
    -----
    TensorFlow backend only. Not XLA-compilable (``supports_jit = False``, so Keras's
    ``jit_compile="auto"`` leaves it off); tracing it inside ``jit_compile=True`` raises
    a clear error. A model holding it cannot be exported as a SavedModel for serving:
    ``keras_layer.convert(model, to="keras")`` gives the same model with stock layers.

    Masks are Keras's: a mask over ``inputs.shape[:-1]`` (what ``Masking``,
    ``Embedding(mask_zero=True)`` and RNN layers give), or anything that broadcasts to
    the inputs once expanded at the last axis, whatever ``axis`` is; it weights the
    training statistics (computed by Keras's own code, in TensorFlow ops) and is
    ignored in inference.
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

    __init__.__signature__ = _init_signature(_STOCK.__init__, __init__)
    __signature__ = _ClassOnlySignature(
        __init__.__signature__.replace(
            parameters=list(__init__.__signature__.parameters.values())[1:]))

    def build(self, input_shape):
        # The stock layer indexes `input_shape[axis]` unchecked (an IndexError).
        rank = len(input_shape)
        axes = list(self.axis) if isinstance(self.axis, (list, tuple)) else [self.axis]
        for axis in axes:
            if not -rank <= axis < rank:
                raise ValueError(
                    f"Layer '{self.name}': axis {axis} is out of range for inputs of rank "
                    f"{rank}, shape {tuple(input_shape)} (valid axes: {-rank} to "
                    f"{rank - 1}). Received: axis={self.axis}")
        super().build(input_shape)

    def call(self, inputs, training=None, mask=None):
        from . import _bridge

        if _in_xla_context():
            raise ValueError(
                f"Layer '{self.name}' (keras_layer.BatchNormalization) cannot be compiled "
                "with XLA (jit_compile=True): it runs numbabn's NumPy kernels. Compile "
                "without jit_compile, or convert the model with "
                "keras_layer.convert(model, to='keras').")
        if (mask is not None and training and self.trainable) or not self._kernels_take(inputs):
            # Keras's own code (TensorFlow ops): masked statistics (numbabn has no weighted
            # kernel), with Keras's mask semantics, checks and errors unchanged; and the
            # inputs the kernels refuse but the stock layer takes (see `_kernels_take`).
            return super().call(inputs, training=training, mask=mask)
        if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
            # Keras's check; past it, inference ignores the mask.
            raise ValueError(
                "The mask provided should be one dimension less than the inputs. "
                f"Received: mask.shape={mask.shape}, inputs.shape={inputs.shape}")

        axis = self.axis % len(inputs.shape)
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        # Half inputs (mixed_float16, mixed_bfloat16) go to the kernels as they are: the
        # kernels read and write float16 and bfloat16 themselves, in float64 arithmetic,
        # so no cast pass runs in TensorFlow ops. Only bfloat16 without the compiled op
        # (the tf.numpy_function bridge) is computed in float32, as Keras does.
        kernel_dtype = compute_dtype
        if inputs.dtype == "float16" or (inputs.dtype == "bfloat16"
                                         and _bridge.native_available("bfloat16")):
            kernel_dtype = inputs.dtype
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

    def _kernels_take(self, inputs):
        """Whether the numbabn kernels run this call. They need a batch and a channel
        axis (rank >= 2), at least one channel and a finite ``epsilon > 0``; the stock
        layer also takes rank-1 inputs (each element its own channel, variance 0), no
        channels, and any ``epsilon``, and those calls run its code. (An empty batch goes
        to the kernels: inference returns an empty batch, training refuses it.)"""
        rank = len(inputs.shape)
        if rank < 2 or inputs.shape[self.axis % rank] == 0:
            return False
        return self.epsilon > 0 and self.epsilon != float("inf")

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        # TensorFlow's SavedModel writer walks every trackable object: stop it here, since
        # the graph's numbabn ops (or numpy_function ops) run Numba code of this process.
        if save_type == "savedmodel":
            raise ValueError(
                f"Layer '{self.name}' (keras_layer.BatchNormalization) cannot be exported as "
                "a TensorFlow SavedModel: it runs numbabn's Numba kernels, which a served "
                "artifact cannot load. Export "
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

                if x.dtype == "bfloat16":  # its NumPy stages run in float32 here
                    x = ops.cast(x, "float32")
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
