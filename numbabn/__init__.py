"""numbabn: batch normalization kernels in Numba, callable from NumPy.

Public API
----------
batch_norm_train
    Normalize with batch statistics; returns ``(y, BatchStats)``.
batch_norm_inference
    Normalize with moving statistics.
batch_norm_backward
    Closed-form gradients ``(dx, dgamma, dbeta)``.
update_moving_stats
    Keras-convention moving-average update, in place.
BatchStats
    ``(mean, var, invstd)`` of one batch.
show_config
    Print the threading layer, thread count, kernel cache and CUDA availability.

The four functions run CUDA kernels (numba-cuda, ``pip install 'numbabn[cuda]'``) when
given GPU arrays: anything with ``__cuda_array_interface__`` (Numba device arrays, CuPy
arrays, PyTorch CUDA tensors). They return Numba device arrays then.

``numbabn.compat`` holds cs231n-style wrappers (``batchnorm_forward`` and friends).
Importing numbabn compiles nothing: kernels compile on first use and are cached on disk
(the CPU kernels; CUDA kernels compile once per process). ``numba.cuda`` is imported only
when a GPU array is first seen.
"""

from .batchnorm import (
    BatchStats,
    batch_norm_backward,
    batch_norm_inference,
    batch_norm_train,
    update_moving_stats,
)

__version__ = "0.1.0"

__all__ = [
    "BatchStats",
    "batch_norm_backward",
    "batch_norm_inference",
    "batch_norm_train",
    "show_config",
    "update_moving_stats",
]


def show_config(file=None):
    """Print how numbabn runs here: threading layer, threads, kernel cache, CUDA.

    Parameters
    ----------
    file : file-like, optional
        Where to print (default: ``sys.stdout``).
    """
    from ._runtime import config_lines

    print("\n".join(config_lines()), file=file)
