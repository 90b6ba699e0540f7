"""numbabn.torch: drop-in ``torch.nn.BatchNorm1d/2d/3d`` running numbabn's kernels.

Install with ``pip install 'numbabn[torch]'``; ``import numbabn`` never imports PyTorch,
only ``import numbabn.torch`` does.

Public API
----------
BatchNorm1d, BatchNorm2d, BatchNorm3d
    Subclasses of ``torch.nn.modules.batchnorm._BatchNorm`` with torch's constructor,
    defaults, parameters, buffers, ``state_dict`` and semantics (unbiased running
    variance, ``momentum=None`` for a cumulative average, ``track_running_stats``,
    ``eval()``); the forward and backward passes are numbabn's.
convert
    Swap the ``torch.nn.BatchNorm*d`` modules of a model for these, or back.
SyncBatchNorm
    ``torch.nn.SyncBatchNorm`` for CPU tensors under ``torch.distributed``: statistics
    merged across ranks (Chan, in rank order, so every rank holds the same bits).

What runs where
---------------
Eager calls on CPU tensors in torch's memory formats (contiguous, ``torch.channels_last``,
``torch.channels_last_3d``) run numbabn's compiled PyTorch op (``numbabn.torch._native``:
one call into C++ per module call, a C++ autograd node, the kernels' tasks on PyTorch's
thread pool); traced code, other strides and subclasses overriding ``_batch_norm_train``
take the Python path, which runs numbabn's CPU kernels on NumPy views of the tensors'
storage, as does everything when the op cannot be built (no compiler; one warning).
Both read every memory format in place, give the same bits, and write an output of the
input's memory format. CUDA tensors run numbabn's CUDA kernels (``numbabn[cuda]``) on
PyTorch's current stream, without copies or host synchronization. float32, float64,
float16 and bfloat16 are read and written by the kernels themselves on both devices
(float64 arithmetic, one rounding per output; bfloat16 on the Python path as an
``ml_dtypes.bfloat16`` view of the tensor, through one float32 copy without ml_dtypes).
Statistics and gradient sums are always accumulated in float64.

Autograd, ``torch.compile`` and ``gradcheck`` work through the custom operators
``numbabn::batch_norm_train``, ``numbabn::batch_norm_inference`` and
``numbabn::batch_norm_backward`` (``torch.compile(model, fullgraph=True)`` traces them
without graph breaks). Double backward (``create_graph=True``) is not supported and
raises ``RuntimeError``.

Examples
--------
>>> import torch, numbabn.torch as nbt
>>> bn = nbt.BatchNorm2d(4)
>>> x = torch.randn(8, 4, 5, 5).to(memory_format=torch.channels_last)
>>> y = bn(x)
>>> y.is_contiguous(memory_format=torch.channels_last), int(bn.num_batches_tracked)
(True, 1)
>>> model = nbt.convert(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)))
>>> isinstance(model[1], nbt.BatchNorm1d)
True
"""

from .convert import convert
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d
from ._sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "convert"]
