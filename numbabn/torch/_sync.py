"""``SyncBatchNorm``: batch statistics synchronized across ``torch.distributed`` ranks.

A drop-in for ``torch.nn.SyncBatchNorm`` on CPU tensors (PyTorch's own refuses CPU
input), built on numbabn's stages (``numbabn.stages``):

forward, training mode, more than one rank in the group
    each rank takes (count, mean, biased variance) of its own batch per channel
    (`batch_moments`, float64), all ranks ``all_gather`` them, and each merges the
    world's parts in rank order with Chan's rule (`merge_moments`): unequal per-rank
    batches (an empty one included) weigh by their counts, and every rank computes the
    same bits from the same gathered inputs. The rank's batch is normalized with the
    merged statistics (`batch_norm_apply`); the running statistics are updated with the
    merged mean and the unbiased merged variance (count over the whole group).
backward
    each rank takes ``sum(dy)`` and ``sum(dy * (x - mean))`` of its batch per channel
    (`batch_norm_grad_sums`), the group adds them up, and each rank computes its
    ``dx`` from the totals (`batch_norm_grad_input`). The weight and bias gradients are
    the rank's own (the local sums), as torch's SyncBatchNorm returns them: the data
    parallel wrapper (``DistributedDataParallel``) sums them with the other parameters.
otherwise (eval mode, one rank, no process group initialised)
    `BatchNorm` of ``numbabn.torch`` on the rank's batch alone, as torch's module falls
    back to ``batch_norm``.

Why ``all_gather`` where torch's backward uses ``all_reduce``: the sums are added here
in rank order, so every rank gets the same bits whatever order the backend's reduction
would use (with more than two ranks a ring reduction adds the parts in a different order
on each rank), for the price of (world size x 2 x C) float64 values instead of 2 x C.
"""

import numpy as np
import torch
import torch.distributed as dist

from .. import stages
from . import _bridge
from .modules import _NumbabnBatchNorm


def _gather(local, group, world_size):
    """Every rank's ``local`` (a float64 array), as a (world_size, ...) array in rank order."""
    parts = [torch.empty(local.shape, dtype=torch.float64) for _ in range(world_size)]
    dist.all_gather(parts, torch.from_numpy(np.ascontiguousarray(local)), group=group)
    return np.stack([p.numpy() for p in parts])


class _SyncBatchNormFunction(torch.autograd.Function):
    """``(y, mean, var, count)`` of the group's batch; autograd through ``y`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world_size):
        channels = x.shape[1]
        # bfloat16: an ml_dtypes view (`_bridge._full`), a float32 copy without ml_dtypes
        xk = _bridge._full(_bridge._kernel_tensor(x))
        local = np.zeros((3, channels))  # an empty batch: a part with a zero count
        if x.numel() > 0:
            local = np.stack(stages.batch_moments(xk, axis=1))
        parts = _gather(local, group, world_size)
        if parts[:, 0].sum() <= 1:
            # torch's message; every rank raises it (all gathered the same counts), so
            # none is left waiting in a collective
            raise ValueError("Expected more than 1 value per channel when training, got "
                             f"{int(parts[:, 0, 0].sum())} over {world_size} ranks")
        total = stages.merge_moments(parts)  # rank order: the same bits on every rank
        invstd = 1.0 / np.sqrt(total.var + eps)
        y, written = _bridge._output_like(x)
        if x.numel() > 0:
            stages.batch_norm_apply(xk, _vector(weight), _vector(bias), total.mean, invstd,
                                    axis=1, out=_bridge._full(written))
        ctx.save_for_backward(x, weight)
        ctx.stats = (total.mean, invstd, total.count)
        ctx.group, ctx.world_size = group, world_size
        ctx.param_dtypes = (None if weight is None else weight.dtype,
                            None if bias is None else bias.dtype)
        mean, var = torch.from_numpy(total.mean), torch.from_numpy(total.var)
        count = torch.tensor(float(total.count[0]), dtype=torch.float64)
        ctx.mark_non_differentiable(mean, var, count)
        return _bridge._finish(y, written), mean, var, count

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar, _dcount):
        if torch.is_grad_enabled():
            raise RuntimeError("numbabn.torch.SyncBatchNorm does not support double "
                               "backward (create_graph=True through it)")
        x, weight = ctx.saved_tensors
        mean, invstd, count = ctx.stats
        channels = x.shape[1]
        xk, dyk = (_bridge._full(_bridge._kernel_tensor(t)) for t in (x, dy))
        local = np.zeros((2, channels))
        if x.numel() > 0:
            local = stages.batch_norm_grad_sums(dyk, xk, mean, axis=1)
        parts = _gather(local, ctx.group, ctx.world_size)
        sums = parts[0].copy()
        for part in parts[1:]:  # rank order (see the module docstring)
            sums += part
        dx, written = _bridge._output_like(x)
        if x.numel() > 0:
            stages.batch_norm_grad_input(dyk, xk, _vector(weight), mean, invstd, sums, count,
                                         axis=1, out=_bridge._full(written))
        weight_dtype, bias_dtype = ctx.param_dtypes
        # the rank's own parameter gradients, as torch's SyncBatchNorm (see the docstring)
        dweight = (None if weight_dtype is None
                   else torch.from_numpy(local[1] * invstd).to(weight_dtype))
        dbias = None if bias_dtype is None else torch.from_numpy(local[0]).to(bias_dtype)
        return _bridge._finish(dx, written), dweight, dbias, None, None, None


def _vector(v):
    return None if v is None else v.detach().to(torch.float64).numpy()


class SyncBatchNorm(_NumbabnBatchNorm):
    """``torch.nn.SyncBatchNorm`` on numbabn's kernels, for CPU tensors.

    Parameters
    ----------
    num_features : int
        ``C``, the channel count (dimension 1 of the input).
    eps : float, default 1e-5
        Added to the variance; must be > 0.
    momentum : float or None, default 0.1
        Weight of the new batch in the running statistics; ``None``: cumulative average.
    affine : bool, default True
        Learn ``weight`` and ``bias``.
    track_running_stats : bool, default True
        Keep ``running_mean``, ``running_var`` and ``num_batches_tracked``.
    process_group : torch.distributed.ProcessGroup, optional
        The ranks whose batches are synchronized; default: the whole world.
    device, dtype : optional
        Of the parameters and buffers.

    Notes
    -----
    Input (N, C, ...) of any rank >= 2, contiguous or channels-last, float16, bfloat16,
    float32 or float64, on the CPU; N may differ between ranks, and be 0 on some. Every
    rank of the group must call ``forward`` (and ``backward``) of its modules in the
    same order, as with torch's module: they are collectives.

    The same parameters, buffers and ``state_dict`` keys as ``torch.nn.SyncBatchNorm``.
    The statistics of the group's batch are the Chan merge of each rank's float64
    (count, mean, variance), in rank order: they equal those of one process on the
    concatenated batch to float64 rounding, and all ranks hold the same bits. No
    ``torch.compile`` support: the collectives run inside an autograd Function.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group
        self._sync = None

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _sync_group(self):
        """``(group, world size)`` when this forward synchronizes, else None (torch's
        rule: training mode, an initialised process group of more than one rank)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        world_size = dist.get_world_size(group)
        return (group, world_size) if world_size > 1 else None

    def forward(self, input):
        """Normalize ``input`` as ``torch.nn.SyncBatchNorm`` does (see the class Notes)."""
        if input.dim() >= 2 and input.shape[1] == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")
        self._sync = self._sync_group()
        try:
            return super().forward(input)
        finally:
            self._sync = None

    def _check_arguments(self, input, weight, bias, running_mean, running_var, bn_training):
        if self._sync is not None and bn_training:
            if input.device.type != "cpu":
                raise NotImplementedError(
                    "numbabn.torch.SyncBatchNorm synchronizes CPU tensors only (numbabn's "
                    f"stages have no GPU path yet); got input on {input.device}. Use "
                    "torch.nn.SyncBatchNorm for GPU tensors")
            if self.eps <= 0.0:
                raise ValueError(f"batch_norm eps must be positive during training, but got "
                                 f"{self.eps}")
            # no "more than 1 value per channel" check on the rank's batch: one value, or
            # none, is fine when the group's batch has more (checked on the total)
            bn_training = False
        super()._check_arguments(input, weight, bias, running_mean, running_var, bn_training)

    def _empty_batch(self, input):
        if self._sync is None:
            return super()._empty_batch(input)
        # An empty share still takes part in the collectives (the other ranks wait for
        # its parts), and its running statistics follow the group's, as in torch's module.
        # (`forward` has counted the batch in num_batches_tracked already.)
        y, mean, var, count = self._batch_norm_train(input)
        if self.track_running_stats and self.running_mean is not None:
            factor = (1.0 / self.num_batches_tracked.to(torch.float64)
                      if self.momentum is None else self.momentum)
            self._update_running_stats(self.running_mean, self.running_var, mean, var,
                                       count, factor)
        return y

    def _batch_norm_train(self, input):
        if self._sync is None:
            return super()._batch_norm_train(input)
        group, world_size = self._sync
        y, mean, var, count = _SyncBatchNormFunction.apply(
            input, self.weight, self.bias, self.eps, group, world_size)
        return y, mean, var, float(count)

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """``module`` with every BatchNorm*d (``torch.nn``'s or numbabn's, not other
        subclasses) replaced by a `SyncBatchNorm` holding the same tensors.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: in place for the children,
        the new module returned when ``module`` itself is a batch norm.
        """
        from . import modules

        kinds = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                 modules.BatchNorm1d, modules.BatchNorm2d, modules.BatchNorm3d)
        if type(module) in kinds:
            new = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, device="meta")
            for name in ("weight", "bias"):
                new._parameters[name] = module._parameters.get(name)
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                new._buffers[name] = module._buffers.get(name)
            new.train(module.training)
            if hasattr(module, "qconfig"):
                new.qconfig = module.qconfig
            return new
        for name, child in module.named_children():
            converted = cls.convert_sync_batchnorm(child, process_group)
            if converted is not child:
                module.add_module(name, converted)
        return module
