"""CUDA backend: the CPU backend's contract (``_cpu``) on GPU arrays.

Inputs arrive validated (``_validation``) as Numba device arrays, in any float dtype:
float16, float32, float64, and bfloat16 (``ml_dtypes.bfloat16``, as on the CPU), which
`kernel_array` hands to the kernels as a view of its bits (int16). Half formats are read
and written by the kernels themselves: no converted copy. Per-channel vectors may be
host arrays (float64, from validation: copied to the GPU here, C values each) or GPU
arrays of any float dtype (converted to float64 on the GPU when they are not float64). Every result is
a GPU array: full-size ones laid out like ``x`` (or the caller's ``out``), per-channel
ones float64 of shape (C,). Nothing is copied back to the host, and nothing waits for
the GPU: the kernels run in order on Numba's default stream, or on the stream a caller
set with ``_device.on_stream`` (numbabn.torch passes PyTorch's current stream).

Launch geometry comes from the shape and ``numbabn.config`` alone, in `launch_plan`.
"""

import functools
import warnings
from typing import NamedTuple

import numpy as np

from . import _device, config
from . import _kernels_cuda as k
from ._half import cuda_storage_view
from ._layout import blocks, layout_of


def kernel_array(a):
    """``a`` as the kernels take it (batchnorm.py's hook): bfloat16 as a view of its bits
    (int16; no copy), float16, float32 and float64 as they are."""
    return cuda_storage_view(a)


class LaunchPlan(NamedTuple):
    """How one layout is cut into blocks; see `launch_plan`."""

    threads: int      # threads per block (power of two): selects ``kernels(threads)``
    block: tuple      # (tx, ty) for rows, (threads,) for planes
    grid: tuple       # (channel tiles or channels, blocks per channel)
    per_block: int    # rows (rows layout) or flattened elements (planes) of one block

    @property
    def blocks_per_channel(self):
        return self.grid[1]


def launch_plan(layout):
    """Block shape and grid for a layout, from its shape and ``config`` alone.

    Rows ``(R, C)``: a block is ``tx x ty`` threads, ``tx`` the smallest power of two
    covering the channels (at most the whole block), so a warp reads consecutive
    channels of a row; channel tiles of ``tx`` go along the grid's x. Planes
    ``(O, C, I)``: a block's threads run along ``I``, channels go along the grid's x.
    Along y, each channel's elements are cut into equal chunks: enough blocks in all
    to fill a large GPU (``CUDA_TARGET_BLOCKS``), at most ``CUDA_MAX_BLOCKS_PER_CHANNEL``
    per channel, and at least ``CUDA_MIN_ELEMENTS_PER_THREAD`` elements per thread.
    The device never enters: the summation order, hence every bit of the result, is
    a function of the shape.
    """
    threads = config.CUDA_THREADS_PER_BLOCK
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"numbabn.config.CUDA_THREADS_PER_BLOCK must be a power of two; "
                         f"got {threads}")
    if layout.is_rows:
        tx = min(threads, 1 << (layout.channels - 1).bit_length())
        block = (tx, threads // tx)
        across = -(-layout.channels // tx)
        total, at_once = layout.outer, block[1]
    else:
        block = (threads,)
        across = layout.channels
        total, at_once = layout.count, threads
    n_blocks = max(1, min(config.CUDA_MAX_BLOCKS_PER_CHANNEL,
                          -(-config.CUDA_TARGET_BLOCKS // across),
                          -(-total // (at_once * config.CUDA_MIN_ELEMENTS_PER_THREAD))))
    per_block = -(-total // n_blocks)
    return LaunchPlan(threads, block, (across, -(-total // per_block)), per_block)


def _launch(kernel, grid, block):
    """``kernel[grid, block]``: a launch configuration, cached on a GPU.

    Numba warns (NumbaPerformanceWarning) when it configures a grid of fewer than 128
    blocks. The per-channel kernels and small inputs have such grids by nature, so
    the warning would only be noise to numbabn's users; configurations are made once,
    with it silenced, and reused (which also saves their set-up on every call). The
    simulator's kernels hold their configuration themselves, so there it is made anew.
    """
    stream = _device.current_stream()
    if _device.simulated():
        return kernel[grid, block, stream]
    return _configured(kernel, grid, block, stream)


@functools.lru_cache(maxsize=1024)
def _configured(kernel, grid, block, stream=0):
    # a stream is part of the key: callers that pass one reuse its Numba object
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return kernel[grid, block, stream]


def _per_channel(name, channels):
    """A per-channel kernel (one thread per channel) configured for ``channels``."""
    threads = config.CUDA_THREADS_PER_BLOCK
    return _launch(getattr(k.kernels(threads), name), (-(-channels // threads),),
                   (threads,))


def _name(layout):
    return "rows" if layout.is_rows else "planes"


# ------------------------------------------------------------------- array plumbing

def _view(a, layout):
    """``a`` viewed as the layout's rows or planes, or None if that needs a copy."""
    v = blocks(_device.shadow(a), layout)
    return None if v is None else _device.view(a, v.shape, v.strides)


def _prepare(x, axis):
    """Layout and view of ``x``; copies only unmergeable strided inputs (as the CPU)."""
    layout = layout_of(_device.shadow(x), axis)
    v = _view(x, layout)
    if v is None:
        x = _copy(x)
        layout = layout_of(_device.shadow(x), axis)
        v = _view(x, layout)
    return layout, v


def _copy(a):
    c = _device.empty(a.shape, a.dtype)
    _device.copy_into(c, a)
    return c


def _input_view(a, layout):
    """``a`` (dy) through ``x``'s layout, copied into that order if it must be."""
    v = _view(a, layout)
    if v is None:
        v = _view(_empty_like_layout(a.shape, a.dtype, layout, fill=a), layout)
    return v


def _empty_like_layout(shape, dtype, layout, fill=None):
    """A new GPU array of logical ``shape`` whose memory follows ``layout``'s walk."""
    walk = _device.empty([shape[a] for a in layout.perm], dtype)
    if layout.perm == tuple(range(len(shape))):
        a = walk
    else:
        strides = [0] * len(shape)
        for position, axis in enumerate(layout.perm):
            strides[axis] = walk.strides[position]
        a = _device.view(walk, shape, strides)
    if fill is not None:
        _device.copy_into(a, fill)
    return a


def _output(out, x, layout):
    """(array to return, view the kernel writes, array to copy the result to)."""
    if out is not None:
        v = _view(out, layout)
        if v is not None:
            return out, v, None
    y = _empty_like_layout(x.shape, x.dtype, layout)
    return y, _view(y, layout), out


def _finish(y, copy_to):
    if copy_to is None:
        return y
    _device.copy_into(copy_to, y)
    return copy_to


def _vec64(v):
    """A per-channel vector as a float64 GPU array (host ones are copied, C values)."""
    if v is None:
        return None
    if isinstance(v, np.ndarray):
        return _device.to_device(v.astype(np.float64, copy=False))
    if v.dtype == np.float64:
        return v
    out = _device.empty(v.shape, np.float64)
    _per_channel("to_float64", v.shape[0])(kernel_array(v), out)
    return out


def _empty_vectors(channels, count):
    """``count`` float64 vectors of ``channels``, rows of one allocation (each allocation
    costs a driver call: they add up on small inputs)."""
    rows = _device.empty((count, channels), np.float64)
    return [rows[i] for i in range(count)]


def _partials(channels, plan, count):
    """``count`` float64 (channels, blocks per channel) arrays, for stage 1's results."""
    block = _device.empty((count, channels, plan.blocks_per_channel), np.float64)
    return [block[i] for i in range(count)]


# ------------------------------------------------------------------------- backend

def channel_stats(x, axis):
    """Per-channel mean and biased variance (float64), Welford + Chan, two stages."""
    layout, xv = _prepare(x, axis)
    plan = launch_plan(layout)
    kern = k.kernels(plan.threads)
    C = layout.channels
    pn, pmean, pm2 = _partials(C, plan, 3)
    stage1 = getattr(kern, "stats_" + _name(layout))
    _launch(stage1, plan.grid, plan.block)(xv, plan.per_block, pn, pmean, pm2)
    mean, var = _empty_vectors(C, 2)
    _launch(kern.merge_moments, (C,), (plan.threads,))(pn, pmean, pm2, mean, var)
    return mean, var


def affine(x, axis, center, scale, offset, out=None):
    """``(x - center) * scale + offset`` per channel."""
    layout, xv = _prepare(x, axis)
    plan = launch_plan(layout)
    y, yv, copy_to = _output(out, x, layout)
    kernel = getattr(k.kernels(plan.threads), "affine_" + _name(layout))
    _launch(kernel, plan.grid, plan.block)(xv, plan.per_block, _vec64(center),
                                           _vec64(scale), _vec64(offset), yv)
    return _finish(y, copy_to)


def grad_sums(dy, x, axis, mean):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` (float64), two stages."""
    layout, xv = _prepare(x, axis)
    dyv = _input_view(dy, layout)
    plan = launch_plan(layout)
    kern = k.kernels(plan.threads)
    C = layout.channels
    p1, p2 = _partials(C, plan, 2)
    stage1 = getattr(kern, "grad_sums_" + _name(layout))
    _launch(stage1, plan.grid, plan.block)(dyv, xv, plan.per_block, _vec64(mean), p1, p2)
    sum_dy, sum_dy_xmu = _empty_vectors(C, 2)
    _launch(kern.merge_sums, (C,), (plan.threads,))(p1, p2, sum_dy, sum_dy_xmu)
    return sum_dy, sum_dy_xmu


def grad_input(dy, x, axis, mean, k_dy, mean_dy, k_x, out=None):
    """``k_dy * (dy - mean_dy) - k_x * (x - mean)`` per channel."""
    layout, xv = _prepare(x, axis)
    dyv = _input_view(dy, layout)
    plan = launch_plan(layout)
    dx, dxv, copy_to = _output(out, x, layout)
    kernel = getattr(k.kernels(plan.threads), "grad_input_" + _name(layout))
    _launch(kernel, plan.grid, plan.block)(dyv, xv, plan.per_block, _vec64(mean),
                                           _vec64(k_dy), _vec64(mean_dy), _vec64(k_x), dxv)
    return _finish(dx, copy_to)


# -------------------------------------------------------------- per-channel maths

def norm_coeffs(var, eps, gamma, beta):
    """``(invstd, scale, offset)`` of the normalization; see ``_cpu.norm_coeffs``."""
    var, gamma, beta = _vec64(var), _vec64(gamma), _vec64(beta)
    invstd, scale, offset = _empty_vectors(var.shape[0], 3)
    _per_channel("norm_coeffs", var.shape[0])(
        var, eps, invstd if gamma is None else gamma, gamma is not None,
        invstd if beta is None else beta, beta is not None, invstd, scale, offset)
    return invstd, scale, offset


def grad_coeffs(sum_dy, sum_dy_xmu, invstd, gamma, n):
    """``(dgamma, k_dy, mean_dy, k_x)`` of the backward; see ``_cpu.grad_coeffs``."""
    invstd, gamma = _vec64(invstd), _vec64(gamma)
    channels = invstd.shape[0]
    dgamma, k_dy, mean_dy, k_x = _empty_vectors(channels, 4)
    _per_channel("grad_coeffs", channels)(
        sum_dy, sum_dy_xmu, invstd, invstd if gamma is None else gamma,
        gamma is not None, float(n), dgamma, k_dy, mean_dy, k_x)
    return dgamma, k_dy, mean_dy, k_x


def update_moving(moving, batch, momentum):
    """``moving = moving * momentum + batch * (1 - momentum)`` in place, float64 inside."""
    _per_channel("moving_update", moving.shape[0])(kernel_array(moving), _vec64(batch),
                                                   momentum)


# ------------------------------------------------ operations (as the CPU backend's)

def train(x, axis, gamma, beta, eps, out=None):
    """Batch statistics and the normalized ``x``: ``(y, mean, var, invstd)``."""
    mean, var = channel_stats(x, axis)
    invstd, scale, offset = norm_coeffs(var, eps, gamma, beta)
    return affine(x, axis, mean, scale, offset, out), mean, var, invstd


def inference(x, axis, gamma, beta, moving_mean, moving_var, eps, out=None):
    """``x`` normalized with the moving statistics."""
    _, scale, offset = norm_coeffs(moving_var, eps, gamma, beta)
    return affine(x, axis, moving_mean, scale, offset, out)


def backward(dy, x, axis, gamma, mean, invstd, out=None):
    """The closed-form backward: ``(dx, dgamma, dbeta)``."""
    n = x.size // x.shape[axis]
    sum_dy, sum_dy_xmu = grad_sums(dy, x, axis, mean)
    dgamma, k_dy, mean_dy, k_x = grad_coeffs(sum_dy, sum_dy_xmu, invstd, gamma, n)
    return grad_input(dy, x, axis, mean, k_dy, mean_dy, k_x, out), dgamma, sum_dy
