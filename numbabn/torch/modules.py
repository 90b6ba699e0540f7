"""``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``: ``torch.nn``'s modules on numbabn's kernels.

They subclass ``torch.nn.modules.batchnorm._BatchNorm`` and keep its constructor,
parameters, buffers, ``state_dict`` keys and ``extra_repr``; only ``forward`` differs:
it mirrors ``_BatchNorm.forward`` and ``torch.nn.functional.batch_norm`` branch by branch
(which statistics normalize, when and how the buffers are updated, the checks) and
runs numbabn's kernels instead of ``torch.batch_norm``: eagerly on CPU tensors in
torch's memory formats, the compiled op (``_native``: statistics, running update and
output in one call, autograd in C++); otherwise ``_ops.train`` / ``_ops.inference``
(the custom operators when traced, the same bridge functions without the dispatcher
eagerly) and the running update here. Both give the same bits.
"""

import os

import numba
import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm

from .. import _cache
from . import _bridge, _native, _ops


@numba.njit(cache=True)
def _moving_update(running_mean, running_var, mean, var, factor, bessel):
    """``running = running * (1 - factor) + batch * factor`` for both buffers, in
    float64 (``batch``: ``mean``, and ``var * bessel``, the unbiased variance)."""
    keep = 1.0 - factor
    for c in range(mean.shape[0]):
        running_mean[c] = np.float64(running_mean[c]) * keep + mean[c] * factor
        running_var[c] = np.float64(running_var[c]) * keep + (var[c] * bessel) * factor


_cache.lock_saves([_moving_update])  # see numbabn._cache


_NATIVE_DTYPES = {torch.float32: "float32", torch.float64: "float64",
                  torch.float16: "float16", torch.bfloat16: "bfloat16"}
_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


#: the compiled op may be tried (``NUMBABN_TORCH_OP`` is not ``0``; read at import)
_NATIVE_ENABLED = os.environ.get("NUMBABN_TORCH_OP", "1") != "0"


def _parameter_dtype_fits(param_dtype, input_dtype):
    """torch's rule: parameters and buffers of the input's dtype, or float32 ones with
    float16/bfloat16 input."""
    return param_dtype == input_dtype or (
        param_dtype == torch.float32 and input_dtype in (torch.float16, torch.bfloat16))


def _member(module, members, name):
    """``getattr(module, name)`` for a parameter or buffer, read from its dict when it
    is there (``nn.Module.__getattr__`` costs ~1 us a name: the failed instance lookup
    first); a parametrized or reassigned one through ``getattr``."""
    return members[name] if name in members else getattr(module, name)


class _NumbabnBatchNorm(_BatchNorm):
    """``_BatchNorm`` with numbabn's forward; the rank check is the subclasses'."""

    def forward(self, input):
        """Normalize ``input`` (N, C, ...) as ``torch.nn.BatchNorm*d`` does.

        Training mode (or no running statistics): batch statistics, and the running
        statistics, when tracked, updated with the batch mean and the unbiased batch
        variance, weighted by ``momentum`` (or ``1 / num_batches_tracked`` when
        ``momentum`` is None). Eval mode with running statistics: those.
        """
        self._check_input_dim(input)
        eager = not torch.compiler.is_compiling()
        training, tracking = self.training, self.track_running_stats
        factor = 0.0 if self.momentum is None else self.momentum
        buffers = self._buffers
        if training and tracking and (num_batches_tracked := _member(
                self, buffers, "num_batches_tracked")) is not None:
            num_batches_tracked.add_(1)
            if self.momentum is None:
                # eagerly the float, the same float64 number; a tensor when traced, since
                # reading the value back would break a torch.compile graph
                factor = (1.0 / float(num_batches_tracked) if eager
                          else 1.0 / num_batches_tracked.to(torch.float64))
        # as _BatchNorm: buffers are passed (so updated) only when tracked in training
        if not training or tracking:
            running_mean = _member(self, buffers, "running_mean")
            running_var = _member(self, buffers, "running_var")
        else:
            running_mean = running_var = None
        bn_training = training or (running_mean is None and running_var is None)
        params = self._parameters
        weight, bias = _member(self, params, "weight"), _member(self, params, "bias")
        self._check_arguments(input, weight, bias, running_mean, running_var, bn_training)
        if input.numel() == 0:
            return self._empty_batch(input)

        if eager and self._native_path(input):
            op = _native.ensure(_NATIVE_DTYPES[input.dtype])
            if op is not None:  # the whole call in C++ (see numbabn.torch._native)
                if bn_training:
                    if running_mean is None or running_var is None:
                        running_mean = running_var = None
                    return op(input, weight, bias, running_mean, running_var, True,
                              float(factor), self.eps)
                return op(input, weight, bias, running_mean, running_var, False, 0.0,
                          self.eps)
        if not bn_training:
            return _ops.inference(input, weight, bias, running_mean, running_var, self.eps)
        y, mean, var, count = self._batch_norm_train(input)
        if running_mean is not None and running_var is not None:
            self._update_running_stats(running_mean, running_var, mean, var, count, factor)
        return y

    def _native_path(self, input):
        """Whether ``input`` goes to the compiled op: a CPU tensor, contiguous or in its
        rank's channels-last format (other strides take the Python path, which reads
        them in place), outside functorch transforms, in a module whose batch statistics
        and running update are this class's own (a subclass overriding
        `_batch_norm_train` or `_update_running_stats` keeps its seam)."""
        cls = type(self)
        return (_NATIVE_ENABLED and input.is_cpu
                and cls._batch_norm_train is _NumbabnBatchNorm._batch_norm_train
                and cls._update_running_stats is _NumbabnBatchNorm._update_running_stats
                and (input.is_contiguous() or (
                    input.dim() in _CHANNELS_LAST
                    and input.is_contiguous(memory_format=_CHANNELS_LAST[input.dim()])))
                and not torch._C._are_functorch_transforms_active())

    def _batch_norm_train(self, input):
        """Normalize ``input`` with batch statistics: ``(y, mean, var, count)``.

        ``mean`` and ``var`` (biased) are float64 (C,) tensors (or NumPy arrays, on the
        eager CPU path), ``count`` the number of
        elements per channel they were taken over (the running variance is updated with
        ``var * count / (count - 1)``). The seam for statistics taken beyond this batch
        (synchronized across processes): a subclass overrides this method alone, and
        `forward` keeps the checks and the running-statistics rules.
        """
        y, mean, var = _ops.train(input, self.weight, self.bias, self.eps)
        return y, mean, var, input.numel() // input.shape[1]

    def _empty_batch(self, input):
        """torch's result for an empty batch: an empty output, the running statistics
        unchanged (``num_batches_tracked`` counts it), zero parameter gradients. The
        kernels refuse empty input, so the affine map is applied with tensor ops."""
        shape = (1, -1) + (1,) * (input.dim() - 2)
        y = input.clone() if self.weight is None else input * self.weight.view(shape)
        return y if self.bias is None else y + self.bias.view(shape)

    @staticmethod
    def _update_running_stats(running_mean, running_var, mean, var, count, factor):
        """``running = (1 - factor) * running + factor * batch``, in float64, in place.

        With NumPy statistics (the eager CPU path) one compiled loop (`_moving_update`)
        does the arithmetic on the (C,) float64 values, the same operations in the same
        order as the tensor expression (so the same bits: no fused multiply-add),
        written through the buffers' NumPy views, whose version counters are then bumped
        as an in-place torch op would: ~2 us where the tensor expression costs ~25 us.
        """
        if isinstance(mean, np.ndarray):
            _moving_update(running_mean.numpy(), running_var.numpy(), mean, var,
                           float(factor), count / (count - 1))
            torch.autograd.graph.increment_version((running_mean, running_var))
            return
        with torch.no_grad():
            unbiased = var * (count / (count - 1))
            for running, batch in ((running_mean, mean), (running_var, unbiased)):
                running.copy_(running.to(torch.float64) * (1.0 - factor) + batch * factor)

    def _check_arguments(self, input, weight, bias, running_mean, running_var, bn_training):
        """torch's checks, with messages that say which argument and what was expected."""
        dtype = input.dtype
        if dtype not in _bridge.FLOAT_DTYPES:
            # torch raises NotImplementedError for a dtype its kernel lacks; so do we
            raise NotImplementedError(
                f'"batch_norm" not implemented for {input.dtype}: '
                f"numbabn.torch.{type(self).__name__} "
                "takes float16, bfloat16, float32 or float64 input")
        channels = input.shape[1]
        cpu = input.is_cpu
        # the common case in one pass of cheap tests; the named checks, with their
        # messages, only when one of these fails
        for t in (weight, bias, running_mean, running_var):
            if t is not None and (t.numel() != channels or t.is_cpu != cpu or not cpu
                                  or not _parameter_dtype_fits(t.dtype, dtype)):
                self._check_each(input, weight, bias, running_mean, running_var)
                break
        if bn_training:
            if input.numel() // channels == 1:
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {input.size()}")
            if self.eps <= 0.0:
                raise ValueError(f"batch_norm eps must be positive during training, but got "
                                 f"{self.eps}")
        else:
            if running_mean is None or running_var is None:  # a buffer set to None by hand
                name = "running_mean" if running_mean is None else "running_var"
                raise RuntimeError(f"{name} must be defined in evaluation mode (as torch)")
            if self.eps < 0.0:
                raise ValueError(f"batch_norm eps must be non-negative, but got {self.eps}")

    def _check_each(self, input, weight, bias, running_mean, running_var):
        """`_check_arguments`' per-tensor checks by name, with their messages."""
        name = type(self).__name__
        dtype = input.dtype
        channels = input.shape[1]
        device = input.device
        tensors = (("weight", weight), ("bias", bias),
                   ("running_mean", running_mean), ("running_var", running_var))
        for arg, t in tensors:
            if t is None:
                continue
            if t.numel() != channels:
                raise RuntimeError(
                    f"{arg} should contain {channels} elements not {t.numel()}: the input "
                    f"has {channels} channels (dim 1 of shape {tuple(input.shape)}) and "
                    f"numbabn.torch.{name} was built with num_features={self.num_features}")
            if t.device != device:
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but input is on "
                    f"{input.device} and {arg} on {t.device} (numbabn.torch.{name} does "
                    "not move tensors; call .to(device) on the module or the input)")
            if not _parameter_dtype_fits(t.dtype, dtype):
                raise RuntimeError(
                    f"mixed dtype: {arg} is {t.dtype} but the input is {input.dtype}; "
                    f"numbabn.torch.{name}, as torch, takes parameters of the input's dtype "
                    "(or float32 ones with float16/bfloat16 input)")


class BatchNorm1d(_NumbabnBatchNorm):
    """``torch.nn.BatchNorm1d`` on numbabn's kernels: input (N, C) or (N, C, L).

    Parameters
    ----------
    num_features : int
        ``C``, the channel count.
    eps : float, default 1e-5
        Added to the variance; must be > 0 in training, >= 0 in eval (as torch).
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; ``None``: cumulative average.
    affine : bool, default True
        Learn ``weight`` (scale) and ``bias`` (offset).
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``; without them
        batch statistics are used in eval mode too.
    device, dtype : optional
        Of the parameters and buffers.
    bias : bool, default True (keyword only)
        With ``affine``, learn ``bias`` too.

    Notes
    -----
    The same parameters, buffers and ``state_dict`` as ``torch.nn.BatchNorm1d`` (so
    states load both ways), and the same results within float32 rounding; the batch
    statistics are taken in float64 with a shifted, stable merge (see
    ``numbabn.batch_norm_train``), so large-mean channels keep their variance.
    """

    def _check_input_dim(self, input):
        if input.dim() != 2 and input.dim() != 3:
            raise ValueError(f"expected 2D or 3D input (got {input.dim()}D input)")


class BatchNorm2d(_NumbabnBatchNorm):
    """``torch.nn.BatchNorm2d`` on numbabn's kernels: input (N, C, H, W), contiguous or
    ``torch.channels_last`` (read in place, output in the same memory format).

    Parameters and Notes as `BatchNorm1d`.
    """

    def _check_input_dim(self, input):
        if input.dim() != 4:
            raise ValueError(f"expected 4D input (got {input.dim()}D input)")


class BatchNorm3d(_NumbabnBatchNorm):
    """``torch.nn.BatchNorm3d`` on numbabn's kernels: input (N, C, D, H, W), contiguous
    or ``torch.channels_last_3d``.

    Parameters and Notes as `BatchNorm1d`.
    """

    def _check_input_dim(self, input):
        if input.dim() != 5:
            raise ValueError(f"expected 5D input (got {input.dim()}D input)")
