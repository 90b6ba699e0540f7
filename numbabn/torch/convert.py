"""`convert`: swap ``torch.nn.BatchNorm*d`` modules in a model for numbabn's, and back."""

from torch import nn

from . import modules

_TO_NUMBABN = {nn.BatchNorm1d: modules.BatchNorm1d, nn.BatchNorm2d: modules.BatchNorm2d,
               nn.BatchNorm3d: modules.BatchNorm3d}
_TO_TORCH = {ours: stock for stock, ours in _TO_NUMBABN.items()}
_TARGETS = {"numbabn": _TO_NUMBABN, "torch": _TO_TORCH}


def convert(module, to="numbabn"):
    """Swap every batch-norm module of ``module`` (recursively) for the other implementation.

    Parameters
    ----------
    module : torch.nn.Module
        A model, or a batch-norm module itself.
    to : {"numbabn", "torch"}, default "numbabn"
        ``"numbabn"``: each ``torch.nn.BatchNorm1d/2d/3d`` (exactly those classes, not
        subclasses such as ``SyncBatchNorm`` or lazy modules) becomes
        ``numbabn.torch.BatchNorm1d/2d/3d``; ``"torch"``: the reverse (for
        ``torch.export``, TorchScript or ONNX, which need the stock modules).

    Returns
    -------
    torch.nn.Module
        ``module`` itself with its children swapped in place, or the new module when
        ``module`` is a batch-norm module.

    Notes
    -----
    The new modules take over the old ones' parameters and buffers as the same tensor
    objects (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does): state, device,
    dtype and ``requires_grad`` carry over, and an optimizer built on the model keeps
    working. The configuration (``num_features``, ``eps``, ``momentum``, ``affine``,
    ``track_running_stats``) and the ``training`` flag are copied.

    Examples
    --------
    >>> import torch, numbabn.torch as nbt
    >>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
    >>> type(nbt.convert(model)[1]).__module__
    'numbabn.torch.modules'
    >>> type(nbt.convert(model, to="torch")[1]) is torch.nn.BatchNorm2d
    True
    """
    try:
        mapping = _TARGETS[to]
    except (KeyError, TypeError):
        raise ValueError(f'to must be "numbabn" or "torch"; got {to!r}') from None
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module; got {type(module).__name__}")
    return _convert(module, mapping)


def _convert(module, mapping):
    target = mapping.get(type(module))
    if target is not None:
        return _swap(module, target)
    for name, child in module.named_children():
        converted = _convert(child, mapping)
        if converted is not child:
            module.add_module(name, converted)
    return module


def _swap(bn, cls):
    # built on the meta device (nothing allocated), then given bn's own tensors
    new = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
              device="meta")
    for name in ("weight", "bias"):
        new._parameters[name] = bn._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new._buffers[name] = bn._buffers.get(name)
    new._non_persistent_buffers_set = set(bn._non_persistent_buffers_set)
    new.train(bn.training)
    if hasattr(bn, "qconfig"):
        new.qconfig = bn.qconfig
    return new
