"""Argument checks of the public API, shared by every backend.

Each check raises before any kernel runs, with a message that names the argument, what
was expected and what was given: ``TypeError`` for a wrong kind or dtype, ``ValueError``
for a wrong value or shape.

GPU arrays (``_device.is_device_array``) go through the same checks: they have
``shape``, ``dtype`` and ``strides``, and are never turned into NumPy arrays here (that
would copy them to the host). Which backend runs is decided before these checks, by
where the full-size arrays live (``batchnorm._backend``); a per-channel GPU vector with
host data is a ``TypeError`` here, since numbabn never moves GPU data to the host.
"""

import math
import numbers
import operator

import numpy as np

from . import _device
from ._half import is_bfloat16

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_FLOAT64 = np.dtype(np.float64)  # NumPy's built-in dtypes are singletons: `is` compares


def _dtype_error(name, dtype):
    return TypeError(f"{name} must be a floating-point array (float16, bfloat16 from "
                     f"ml_dtypes, float32 or float64); got dtype {dtype}")


def is_float_dtype(dtype):
    """float16, float32, float64, or ml_dtypes' bfloat16 (recognized without importing
    ml_dtypes: an array of it means the caller has it)."""
    return dtype in FLOAT_DTYPES or is_bfloat16(dtype)


def float_array(a, name):
    """``a`` as an ndarray, or a Numba device array for a GPU array, of a supported float
    dtype (no copy for either)."""
    if a is None:
        raise TypeError(f"{name} must be an array, not None")
    if _device.is_device_array(a):
        arr = _device.as_device_array(a)
        if not is_float_dtype(arr.dtype):
            raise _dtype_error(name, arr.dtype)
        return arr
    arr = np.asarray(a)
    if not is_float_dtype(arr.dtype):
        raise _dtype_error(name, arr.dtype)
    return arr


def batch_input(x, axis, name="x"):
    """Check the batch array and its channel axis; return ``(x, axis)`` with axis >= 0."""
    x = float_array(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions (a batch axis and a "
                         f"channel axis); got shape {x.shape}")
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"axis must be an integer; got {axis!r}") from None
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis {axis} is out of range for {name} with {x.ndim} "
                         f"dimensions (shape {x.shape}); expected -{x.ndim} <= axis < {x.ndim}")
    axis %= x.ndim
    if x.shape[axis] == 0:
        raise ValueError(f"{name} has no channels: shape {x.shape}, axis {axis}")
    if x.size == 0:
        raise ValueError(f"empty batch: {name} has shape {x.shape}, so each of its "
                         f"{x.shape[axis]} channels (axis {axis}) has no elements")
    return x, axis


def channel_vector(v, name, channels, optional=False, device=False, anchor="x"):
    """A per-channel vector of shape ``(channels,)``, or ``None`` if allowed.

    Host vectors come back as float64 ndarrays. GPU vectors are accepted only when the
    work runs on the GPU (``device``), and come back as they are: the CUDA backend
    converts them on the GPU. ``anchor`` names the argument that decided where.
    """
    if v is None and optional:
        return None
    if type(v) is np.ndarray and v.dtype is _FLOAT64 and v.shape == (channels,):
        return v  # the commonest case, in a few hundred nanoseconds
    if type(v) is np.ndarray and is_float_dtype(v.dtype) and v.shape == (channels,):
        return v.astype(np.float64, copy=False)  # the common case, checked at once
    arr = float_array(v, name)
    on_gpu = _device.is_device_array(arr)
    if on_gpu and not device:
        raise TypeError(f"{name} is a GPU array but {anchor} is a host array; numbabn "
                        f"runs where {anchor} is and does not copy GPU arrays to the host: "
                        f"pass {name} as a NumPy array, or {anchor} as a GPU array")
    if tuple(arr.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},), one value per channel "
                         f"of x; got shape {tuple(arr.shape)}")
    return arr if on_gpu else arr.astype(np.float64, copy=False)


def same_as_x(a, x, name):
    """An array that must match ``x`` in shape and dtype (``dy``)."""
    a = float_array(a, name)
    if a.dtype != x.dtype:
        raise TypeError(f"{name} must have the dtype of x ({x.dtype}); got {a.dtype}")
    if tuple(a.shape) != tuple(x.shape):
        raise ValueError(f"{name} must have the shape of x {tuple(x.shape)}; "
                         f"got {tuple(a.shape)}")
    return a


def out_array(out, shape, dtype, inputs, name="out"):
    """Check a caller's output array; it may be an input itself, but not overlap one partly."""
    if out is None:
        return None
    on_gpu = _device.is_device_array(out)
    if not (on_gpu or isinstance(out, np.ndarray)):
        raise TypeError(f"{name} must be a numpy.ndarray (or a GPU array when x is one); "
                        f"got {type(out).__name__}")
    readonly = _device.is_readonly(out) if on_gpu else not out.flags.writeable
    if on_gpu:
        out = _device.as_device_array(out)
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(out.shape)}")
    if out.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}; got {out.dtype}")
    if readonly:
        raise ValueError(f"{name} is read-only")
    may_share, same_view = ((_device.may_share_memory, _device.same_view) if on_gpu
                            else (np.may_share_memory, _same_view))
    for a in inputs:
        if out is not a and may_share(out, a) and not same_view(out, a):
            raise ValueError(f"{name} overlaps an input without being the same array; "
                             f"pass the input itself for an in-place update, or a separate array")
    return out


def _same_view(a, b):
    return (a.__array_interface__["data"][0] == b.__array_interface__["data"][0]
            and a.strides == b.strides and a.shape == b.shape)


def positive_float(value, name, *, zero=False):
    """``value`` as a float, checked finite and > 0 (>= 0 with ``zero``)."""
    if type(value) is float and 0.0 < value < math.inf:  # the common case, at once
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number; got {value!r}")
    if not (math.isfinite(value) and (value > 0 or (zero and value == 0))):
        bound = ">= 0" if zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}; got {value!r}")
    return float(value)


def momentum_value(value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"momentum must be a real number; got {value!r}")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {value!r}")
    return float(value)


def batch_stats(stats, channels, name="stats", device=False):
    """(mean, invstd) from a ``BatchStats`` (or any object with those fields), as
    `channel_vector` returns them."""
    try:
        mean, invstd = stats.mean, stats.invstd
    except AttributeError:
        raise TypeError(f"{name} must be the BatchStats returned by batch_norm_train; "
                        f"got {type(stats).__name__}") from None
    return (channel_vector(mean, f"{name}.mean", channels, device=device),
            channel_vector(invstd, f"{name}.invstd", channels, device=device))


def moving_array(a, name, channels):
    """A moving statistic updated in place: a writeable float ndarray (or GPU array) of
    shape (channels,); returned as a Numba device array for a GPU array."""
    on_gpu = _device.is_device_array(a)
    if not (on_gpu or isinstance(a, np.ndarray)):
        raise TypeError(f"{name} must be a numpy.ndarray or a GPU array (it is updated in "
                        f"place); got {type(a).__name__}")
    arr = float_array(a, name)
    if tuple(arr.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) like the batch "
                         f"statistics; got {tuple(arr.shape)}")
    if _device.is_readonly(a) if on_gpu else not a.flags.writeable:
        raise ValueError(f"{name} is read-only; it is updated in place")
    return arr
