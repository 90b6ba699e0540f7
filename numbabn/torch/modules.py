"""``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d``: ``torch.nn``'s modules on numbabn's kernels.

They subclass ``torch.nn.modules.batchnorm._BatchNorm`` and keep its constructor,
parameters, buffers, ``state_dict`` keys and ``extra_repr``; only ``forward`` differs:
it mirrors ``_BatchNorm.forward`` and ``torch.nn.functional.batch_norm`` branch by branch
(which statistics normalize, when and how the buffers are updated, the checks) and
runs numbabn's operators (``_ops``) instead of ``torch.batch_norm``.
"""

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import _bridge, _ops


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
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                # a tensor, not float(num_batches_tracked): reading the value back
                # would break a torch.compile graph; the same float64 number eagerly
                factor = 1.0 / self.num_batches_tracked.to(torch.float64)
        if self.training:
            bn_training = True
        else:
            bn_training = self.running_mean is None and self.running_var is None
        # as _BatchNorm: buffers are passed (so updated) only when tracked in training
        tracked = not self.training or self.track_running_stats
        running_mean = self.running_mean if tracked else None
        running_var = self.running_var if tracked else None
        self._check_arguments(input, running_mean, running_var, bn_training)
        if input.numel() == 0:
            return self._empty_batch(input)

        if not bn_training:
            return _ops.batch_norm_inference(input, self.weight, self.bias, running_mean,
                                             running_var, self.eps)
        y, mean, var, count = self._batch_norm_train(input)
        if running_mean is not None and running_var is not None:
            self._update_running_stats(running_mean, running_var, mean, var, count, factor)
        return y

    def _batch_norm_train(self, input):
        """Normalize ``input`` with batch statistics: ``(y, mean, var, count)``.

        ``mean`` and ``var`` (biased) are float64 (C,) tensors, ``count`` the number of
        elements per channel they were taken over (the running variance is updated with
        ``var * count / (count - 1)``). The seam for statistics taken beyond this batch
        (synchronized across processes): a subclass overrides this method alone, and
        `forward` keeps the checks and the running-statistics rules.
        """
        y, mean, var, _ = _ops.batch_norm_train(input, self.weight, self.bias, self.eps)
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
        """``running = (1 - factor) * running + factor * batch``, in float64, in place."""
        with torch.no_grad():
            unbiased = var * (count / (count - 1))
            for running, batch in ((running_mean, mean), (running_var, unbiased)):
                running.copy_(running.to(torch.float64) * (1.0 - factor) + batch * factor)

    def _check_arguments(self, input, running_mean, running_var, bn_training):
        """torch's checks, with messages that say which argument and what was expected."""
        name = type(self).__name__
        if input.dtype not in _bridge.FLOAT_DTYPES:
            # torch raises NotImplementedError for a dtype its kernel lacks; so do we
            raise NotImplementedError(
                f'"batch_norm" not implemented for {input.dtype}: numbabn.torch.{name} '
                "takes float16, bfloat16, float32 or float64 input")
        channels = input.shape[1]
        tensors = (("weight", self.weight), ("bias", self.bias),
                   ("running_mean", running_mean), ("running_var", running_var))
        for arg, t in tensors:
            if t is None:
                continue
            if t.numel() != channels:
                raise RuntimeError(
                    f"{arg} should contain {channels} elements not {t.numel()}: the input "
                    f"has {channels} channels (dim 1 of shape {tuple(input.shape)}) and "
                    f"numbabn.torch.{name} was built with num_features={self.num_features}")
            if t.device != input.device:
                raise RuntimeError(
                    "Expected all tensors to be on the same device, but input is on "
                    f"{input.device} and {arg} on {t.device} (numbabn.torch.{name} does "
                    "not move tensors; call .to(device) on the module or the input)")
            if t.dtype != input.dtype and not (
                    t.dtype == torch.float32 and input.dtype in (torch.float16, torch.bfloat16)):
                raise RuntimeError(
                    f"mixed dtype: {arg} is {t.dtype} but the input is {input.dtype}; "
                    f"numbabn.torch.{name}, as torch, takes parameters of the input's dtype "
                    "(or float32 ones with float16/bfloat16 input)")
        if bn_training:
            if input.numel() // channels == 1:
                raise ValueError("Expected more than 1 value per channel when training, "
                                 f"got input size {input.size()}")
            if self.eps <= 0.0:
                raise ValueError(f"batch_norm eps must be positive during training, but got "
                                 f"{self.eps}")
        elif self.eps <= 0.0:
            # torch allows eps == 0 here; numbabn's kernels need eps > 0 (1/sqrt(var + eps)
            # stays finite for a zero running variance)
            raise ValueError(f"numbabn.torch.{name} needs eps > 0; got {self.eps}")


class BatchNorm1d(_NumbabnBatchNorm):
    """``torch.nn.BatchNorm1d`` on numbabn's kernels: input (N, C) or (N, C, L).

    Parameters
    ----------
    num_features : int
        ``C``, the channel count.
    eps : float, default 1e-5
        Added to the variance; must be > 0.
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
