"""numbabn's kernels as PyTorch custom operators (namespace ``numbabn::``), with autograd.

Three functional operators (no argument is mutated, no output aliases an input):

``numbabn::batch_norm_train(x, weight, bias, eps) -> (y, mean, var, invstd)``
    Batch statistics (float64, shape (C,), biased variance) and the normalized ``x``.
``numbabn::batch_norm_inference(x, weight, bias, running_mean, running_var, eps) -> y``
    ``x`` normalized with constant statistics.
``numbabn::batch_norm_backward(dy, x, weight, mean, invstd, training) -> (dx, dw, db)``
    The gradients of either (``training`` says which), ``dw``/``db`` float64 (C,).

Each has a fake (meta) implementation that gives outputs of the real one's shapes,
dtypes and strides (``torch.empty_like`` keeps the memory format in both), so
``torch.compile`` traces through them; the backward is itself an operator, so
AOTAutograd traces the backward graph as well. The autograd formulas save ``x``,
``weight`` and per-channel vectors only: nothing else of ``x``'s size.

Eager calls do not go through the operators (and eager calls on CPU tensors in torch's
memory formats not through this module at all: the modules call the compiled op,
``numbabn.torch._native``, when it is built): `train` and `inference` below run the
same bridge functions (``_bridge``, the one implementation of the maths) through a
``torch.autograd.Function``, or directly when no gradient is wanted, unless
``torch.compiler.is_compiling()``. The operator dispatcher (schema parsing, the
autograd wrapper of ``register_autograd``) costs ~100 us a call, more than the kernels
at (64, 256); the operators, with their fake implementations, stay what Dynamo and
AOTAutograd trace, so compiled graphs have no graph break and give the same bits.

Why the running statistics are not updated in here: an operator that mutates its
arguments (``mutates_args``) cannot have an autograd formula (``register_autograd``
refuses mutable operators), so it would need a second operator for the update and a
graph-level mutation PyTorch must functionalize. Returning the batch statistics and
letting the module update its buffers with ordinary tensor operations under
``no_grad`` is what ``torch.compile(fullgraph=True)`` traces without a graph break
(Dynamo records buffer mutations by plain tensor ops as it does for stock modules).
"""

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from . import _bridge

_LIB = "numbabn::"


# --------------------------------------------------------------------- operators

@torch.library.custom_op(_LIB + "batch_norm_train", mutates_args=())
def batch_norm_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                     eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _bridge.train(x, weight, bias, eps)


@batch_norm_train.register_fake
def _(x, weight, bias, eps):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c, dtype=torch.float64),
            x.new_empty(c, dtype=torch.float64), x.new_empty(c, dtype=torch.float64))


@torch.library.custom_op(_LIB + "batch_norm_inference", mutates_args=())
def batch_norm_inference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                         running_mean: Tensor, running_var: Tensor, eps: float) -> Tensor:
    return _bridge.inference(x, weight, bias, running_mean, running_var, eps)


@batch_norm_inference.register_fake
def _(x, weight, bias, running_mean, running_var, eps):
    return torch.empty_like(x)


@torch.library.custom_op(_LIB + "batch_norm_backward", mutates_args=())
def batch_norm_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor,
                        invstd: Tensor, training: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _bridge.backward(dy, x, weight, mean, invstd, training)


@batch_norm_backward.register_fake
def _(dy, x, weight, mean, invstd, training):
    c = x.shape[1]
    return (torch.empty_like(x), x.new_empty(c, dtype=torch.float64),
            x.new_empty(c, dtype=torch.float64))


# ---------------------------------------------------------------------- autograd

def _no_double_backward():
    # grad mode is on inside a backward only under create_graph=True: a request for
    # gradients of these gradients, which the closed-form kernels do not provide
    if torch.is_grad_enabled():
        raise RuntimeError(
            "numbabn.torch batch norm does not support double backward (create_graph=True "
            "through it): its backward is a fused kernel without a derivative. Use "
            "torch.nn.BatchNorm*d for higher-order gradients (numbabn.torch.convert(model, "
            "to='torch') swaps the modules back)")


def _param_grads(ctx, dweight, dbias):
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (None if weight_dtype is None else dweight.to(weight_dtype),
            None if bias_dtype is None else dbias.to(bias_dtype))


def _train_setup(ctx, inputs, output):
    x, weight, bias, _ = inputs
    _, mean, _, invstd = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)
    ctx.mark_non_differentiable(*output[1:])  # statistics feed the running stats only


def _train_backward(ctx, dy, _dmean, _dvar, _dinvstd):
    _no_double_backward()
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = batch_norm_backward(dy, x, weight, mean, invstd, True)
    return (dx, *_param_grads(ctx, dweight, dbias), None)


def _inference_setup(ctx, inputs, output):
    x, weight, bias, running_mean, running_var, eps = inputs
    invstd = torch.rsqrt(running_var.detach().to(torch.float64) + eps)
    ctx.save_for_backward(x, weight, running_mean.detach(), invstd)
    ctx.param_dtypes = (None if weight is None else weight.dtype,
                        None if bias is None else bias.dtype)


def _inference_backward(ctx, dy):
    _no_double_backward()
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = batch_norm_backward(dy, x, weight, mean, invstd, False)
    return (dx, *_param_grads(ctx, dweight, dbias), None, None, None)


batch_norm_train.register_autograd(_train_backward, setup_context=_train_setup)
batch_norm_inference.register_autograd(_inference_backward, setup_context=_inference_setup)


# ------------------------------------------------------------- the eager path

def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _param_dtypes(weight, bias):
    return (None if weight is None else weight.dtype, None if bias is None else bias.dtype)


def _grads(ctx, dx, dweight, dbias):
    """The backward's results as tensors: ``dx``, and the parameter gradients (float64
    arrays) in the parameters' dtypes, None for an input that needs none."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (dx if need_x else None,
            _as_tensor(dweight, weight_dtype) if need_w else None,
            _as_tensor(dbias, bias_dtype) if need_b else None)


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def _as_tensor(a, dtype):
    """A float64 array as a tensor of ``dtype`` (NumPy's cast: ~1 us against ~3)."""
    if dtype in _NUMPY_DTYPES:
        return torch.from_numpy(a.astype(_NUMPY_DTYPES[dtype], copy=False))
    return torch.from_numpy(a).to(dtype)


class _Train(torch.autograd.Function):
    """`batch_norm_train` on the direct CPU path, with its autograd formula: what the
    operator and ``register_autograd`` do, without the dispatcher. The statistics stay
    NumPy arrays on ``ctx`` (fresh, of size C: nothing for autograd to version)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        y, mean, var, invstd = _bridge.train_direct(x, weight, bias, eps)
        ctx.save_for_backward(x, weight)
        ctx.stats = (mean, var, invstd)
        ctx.param_dtypes = _param_dtypes(weight, bias)
        return y

    @staticmethod
    def backward(ctx, dy):
        _no_double_backward()
        x, weight = ctx.saved_tensors
        mean, _, invstd = ctx.stats
        return (*_grads(ctx, *_bridge.backward_direct(dy, x, weight, mean, invstd, True)),
                None)


class _Inference(torch.autograd.Function):
    """`batch_norm_inference` on the direct CPU path, with its autograd formula."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps):
        # invstd is taken in the backward: no work for forwards that never get one
        ctx.save_for_backward(x, weight, running_mean, running_var)
        ctx.param_dtypes = _param_dtypes(weight, bias)
        ctx.eps = eps
        return _bridge.inference_direct(x, weight, bias, running_mean, running_var, eps)

    @staticmethod
    def backward(ctx, dy):
        _no_double_backward()
        x, weight, running_mean, running_var = ctx.saved_tensors
        mean = running_mean.numpy().astype(np.float64)
        invstd = 1.0 / np.sqrt(running_var.numpy().astype(np.float64) + ctx.eps)
        return (*_grads(ctx, *_bridge.backward_direct(dy, x, weight, mean, invstd, False)),
                None, None, None)


def _apply(function):
    """``function.apply`` without its Python preamble (~6 us: an ``inspect`` check for
    ``setup_context`` and the functorch test), for calls outside functorch transforms;
    `train`/`inference` send those to the operators instead."""
    return torch._C._FunctionBase.__dict__["apply"].__get__(None, function)


_train_apply, _inference_apply = _apply(_Train), _apply(_Inference)


def _traced():
    """Traced by torch.compile, or under a functorch transform (vmap, grad, ...)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active()


def train(x, weight, bias, eps):
    """``(y, mean, var)``, batch mean and biased variance float64 (C,).

    Traced (`_traced`), or for tensors off the direct CPU path
    (``_bridge.direct``): the `batch_norm_train` operator, statistics as tensors.
    Eagerly on the direct path: the same bridge function, through `_Train` when a
    gradient is wanted, statistics as NumPy arrays (the module's running update reads
    them as they are).
    """
    if _traced() or not _bridge.direct(x):
        y, mean, var, _ = batch_norm_train(x, weight, bias, eps)
        return y, mean, var
    if _needs_grad(x, weight, bias):
        y = _train_apply(x, weight, bias, eps)
        mean, var, _ = y.grad_fn.stats
        return y, mean, var
    y, mean, var, _ = _bridge.train_direct(x, weight, bias, eps)
    return y, mean, var


def inference(x, weight, bias, running_mean, running_var, eps):
    """``y``: the `batch_norm_inference` operator traced or off the direct path, the
    bridge function eagerly (through `_Inference` when a gradient is wanted)."""
    if _traced() or not _bridge.direct(x):
        return batch_norm_inference(x, weight, bias, running_mean, running_var, eps)
    if _needs_grad(x, weight, bias):
        return _inference_apply(x, weight, bias, running_mean, running_var, eps)
    return _bridge.inference_direct(x, weight, bias, running_mean, running_var, eps)
