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

Why the running statistics are not updated in here: an operator that mutates its
arguments (``mutates_args``) cannot have an autograd formula (``register_autograd``
refuses mutable operators), so it would need a second operator for the update and a
graph-level mutation PyTorch must functionalize. Returning the batch statistics and
letting the module update its buffers with ordinary tensor operations under
``no_grad`` is what ``torch.compile(fullgraph=True)`` traces without a graph break
(Dynamo records buffer mutations by plain tensor ops as it does for stock modules).
"""

from typing import Optional

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
