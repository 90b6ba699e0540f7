"""CPU backend: picks the kernel for the layout, allocates outputs, runs it safely.

Inputs arrive validated and as the kernels take them (`kernel_array`: float16 and
bfloat16 as views of their bits, which the kernels convert in registers, see ``_half``);
per-channel vectors are float64. Outputs are written
into ``out`` when given (through a view when its memory order allows, else through one
temporary) or into a new array laid out like ``x``.

`train`, `inference` and `backward` are the public functions' operations, each one
compiled call (``_kernels_cpu``'s whole operations); the single passes below them serve
``numbabn.stages``.
"""

import numpy as np

from . import _kernels_cpu as k
from ._layout import blocks, empty_like_layout, input_blocks, prepare
from ._half import storage_view as kernel_array  # noqa: F401 - batchnorm.py's hook
from ._runtime import run_kernel


def any_negative(v):
    """Whether the float64 vector ``v`` has a value < 0 (NaN is not): one compiled loop,
    since ``(v < 0).any()`` costs ~4 us, a third of a small inference call."""
    return k.any_negative(v)


def _output(out, x, layout):
    """(array returned to the caller, blocks view the kernel writes, array to copy to)."""
    if out is not None:
        view = blocks(out, layout)
        if view is not None:
            return out, view, None
    y = empty_like_layout(x.shape, x.dtype, layout)
    return y, blocks(y, layout), out


def _in_place(view, out, first, first_view):
    """What the kernel writes: None where ``out`` is its input ``first`` (``out=x``) and
    ``first_view`` is that array's own view (not a copy `prepare` made), else ``view``.
    With None the whole operations write through their input, compiled for one buffer:
    LLVM vectorizes that loop, while for the same buffer passed twice its runtime overlap
    check fails and the scalar loop runs (see ``_kernels_cpu._into``). Both views come
    from `blocks` of the same array and layout, so sharing memory means being equal."""
    if out is first and view is not None and np.may_share_memory(view, first_view):
        return None
    return view


def _finish(y, copy_to):
    if copy_to is None:
        return y
    np.copyto(copy_to, y)
    return copy_to


def _ones(v, channels):
    return np.ones(channels) if v is None else v


def _zeros(v, channels):
    return np.zeros(channels) if v is None else v


def train(x, axis, gamma, beta, eps, out=None):
    """Batch statistics and the normalized ``x``: ``(y, mean, var, invstd)``."""
    layout, xv = prepare(x, axis)
    y, yv, copy_to = _output(out, x, layout)
    C = layout.channels
    mean, var, invstd = np.empty(C), np.empty(C), np.empty(C)
    kernel = (k.train_rows if layout.is_rows else
              k.train_short if k.short_runs(xv, xv.shape[2]) else k.train_planes)
    run_kernel(kernel, x.size, xv, _ones(gamma, C), _zeros(beta, C), eps, mean, var, invstd,
               _in_place(yv, out, x, xv))
    return _finish(y, copy_to), mean, var, invstd


def inference(x, axis, gamma, beta, moving_mean, moving_var, eps, out=None):
    """``x`` normalized with the moving statistics."""
    layout, xv = prepare(x, axis)
    y, yv, copy_to = _output(out, x, layout)
    C = layout.channels
    kernel = k.inference_rows if layout.is_rows else k.inference_planes
    run_kernel(kernel, x.size, xv, _ones(gamma, C), _zeros(beta, C), moving_mean, moving_var,
               eps, _in_place(yv, out, x, xv))
    return _finish(y, copy_to)


def backward(dy, x, axis, gamma, mean, invstd, out=None):
    """The closed-form backward: ``(dx, dgamma, dbeta)``."""
    layout, xv = prepare(x, axis)
    dyv = input_blocks(dy, layout)
    dx, dxv, copy_to = _output(out, x, layout)
    C = layout.channels
    dgamma, dbeta = np.empty(C), np.empty(C)
    kernel = (k.backward_rows if layout.is_rows else
              k.backward_short if k.short_runs(xv, xv.shape[2]) and k.short_runs(
                  dyv, dyv.shape[2]) else k.backward_planes)
    run_kernel(kernel, x.size, dyv, xv, _ones(gamma, C), mean, invstd,
               _in_place(dxv, out, dy, dyv), dgamma, dbeta)
    return _finish(dx, copy_to), dgamma, dbeta


# ------------------------------------------------- single passes (numbabn.stages)

def channel_stats(x, axis):
    """Per-channel mean and biased variance (float64), shifted sums + Chan's merge."""
    layout, xv = prepare(x, axis)
    mean = np.empty(layout.channels)
    var = np.empty(layout.channels)
    kernel = k.stats_rows if layout.is_rows else k.stats_planes
    run_kernel(kernel, x.size, xv, *layout.plan(), mean, var)
    return mean, var


def affine(x, axis, center, scale, offset, out=None):
    """``(x - center) * scale + offset`` per channel."""
    layout, xv = prepare(x, axis)
    y, yv, copy_to = _output(out, x, layout)
    kernel = k.affine_rows if layout.is_rows else k.affine_planes
    run_kernel(kernel, x.size, xv, *layout.elementwise_plan(), center, scale, offset, yv)
    return _finish(y, copy_to)


def grad_sums(dy, x, axis, mean):
    """Per-channel ``sum(dy)`` and ``sum(dy * (x - mean))`` (float64), one pass."""
    layout, xv = prepare(x, axis)
    dyv = input_blocks(dy, layout)
    sum_dy = np.empty(layout.channels)
    sum_dy_xmu = np.empty(layout.channels)
    kernel = k.grad_sums_rows if layout.is_rows else k.grad_sums_planes
    run_kernel(kernel, x.size, dyv, xv, *layout.plan(), mean, sum_dy, sum_dy_xmu)
    return sum_dy, sum_dy_xmu


def grad_input(dy, x, axis, mean, k_dy, mean_dy, k_x, out=None):
    """``k_dy * (dy - mean_dy) - k_x * (x - mean)`` per channel."""
    layout, xv = prepare(x, axis)
    dyv = input_blocks(dy, layout)
    dx, dxv, copy_to = _output(out, x, layout)
    kernel = k.grad_input_rows if layout.is_rows else k.grad_input_planes
    run_kernel(kernel, x.size, dyv, xv, *layout.elementwise_plan(), mean, k_dy, mean_dy, k_x,
               dxv)
    return _finish(dx, copy_to)


# ---------------------------------------------------------------- per-channel maths
# NumPy on C values. The CUDA backend computes the same formulas in a kernel, so that
# per-channel results stay on the GPU there.

def norm_coeffs(var, eps, gamma, beta):
    """``invstd = 1 / sqrt(var + eps)``, ``scale = invstd * gamma``, ``offset = beta``
    (``gamma``/``beta`` None: 1 and 0)."""
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd if gamma is None else invstd * gamma
    offset = np.zeros(len(var)) if beta is None else beta
    return invstd, scale, offset


def grad_coeffs(sum_dy, sum_dy_xmu, invstd, gamma, n):
    """``(dgamma, k_dy, mean_dy, k_x)``: the per-channel factors of the closed-form
    backward over ``n`` elements per channel (see ``batch_norm_backward``)."""
    dgamma = sum_dy_xmu * invstd
    k_dy = invstd if gamma is None else invstd * gamma
    k_x = k_dy * invstd * dgamma / n
    return dgamma, k_dy, sum_dy / n, k_x


def update_moving(moving, batch, momentum):
    """``moving = moving * momentum + batch * (1 - momentum)``, in place."""
    moving[...] = moving * momentum + batch * (1.0 - momentum)
