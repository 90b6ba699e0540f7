"""Synchronized batch norm across the replicas of a ``tf.distribute`` strategy.

Each replica computes its own (count, mean, variance) with the numbabn kernels; the
replicas exchange them with ``all_gather`` and every replica merges the same list in the
same (replica) order with Chan's rule (`numbabn.stages.merge_moments`). So replicas
agree bitwise, unequal batches (the last, partial batch of an epoch) weigh by their
counts, and large means keep their digits, where the stock layer's
``E[x**2] - E[x]**2`` loses them. The gradient exchanges the per-replica sums of ``dy``
and ``dy * (x - mean)`` the same way before each replica computes its ``dx``; ``gamma``
and ``beta`` get their local sums, which the strategy adds up across replicas as for any
other variable.

A replica may hold no examples (say, the last batch of an epoch split over more workers
than it has examples): it contributes a zero count and zero sums, which the merge skips
or adds as nothing, and gets an empty output and ``dx`` (the kernels themselves refuse
an empty batch). Only a global batch with no examples at all is an error.
"""

import numpy as np
import tensorflow as tf

from numbabn import stages

from ._bridge import _aligned_empty, _channel_params, _gradient_op, _param_grads, _static_shape


def train(x, gamma, beta, axis, epsilon, replica_context):
    """As `_bridge.train`, with statistics over the global batch of all replicas."""
    ctx = replica_context
    flags = (gamma is not None, beta is not None)
    params = [p for p in (gamma, beta) if p is not None]
    channels = x.shape[axis]

    def local_moments(x_np):
        if x_np.size == 0:  # no examples here: a zero count, which merge_moments skips
            return np.zeros((3, channels))
        return np.stack(stages.batch_moments(x_np, axis=axis))

    def merge(gathered):
        total = stages.merge_moments(gathered)
        return total.count, total.mean, total.var, 1.0 / np.sqrt(total.var + epsilon)

    @tf.custom_gradient
    def op(x, *params):
        local = tf.numpy_function(local_moments, [x], tf.float64, stateful=False,
                                  name="numbabn_moments")
        local.set_shape([3, channels])
        gathered = ctx.all_gather(local[None], axis=0)
        count, mean, var, invstd = tf.numpy_function(
            merge, [gathered], [tf.float64] * 4, stateful=False, name="numbabn_merge")
        for t in (count, mean, var, invstd):
            t.set_shape([channels])

        def forward(x_np, mean_np, invstd_np, *params_np):
            g, b = _channel_params(params_np, flags)
            y = _aligned_empty(x_np.shape, x_np.dtype)
            if x_np.size == 0:
                return y
            return stages.batch_norm_apply(x_np, g, b, mean_np, invstd_np, axis=axis, out=y)

        y = tf.numpy_function(forward, [x, mean, invstd, *params], x.dtype, stateful=False,
                              name="numbabn_apply")
        y = _static_shape(y, x)

        def grad(dy, *_unused):
            def sums(dy_np, x_np, mean_np):
                if x_np.size == 0:
                    return np.zeros((2, channels))
                return stages.batch_norm_grad_sums(dy_np, x_np, mean_np, axis=axis)

            local_sums = tf.numpy_function(sums, [dy, x, mean], tf.float64, stateful=False,
                                           name="numbabn_grad_sums")
            local_sums.set_shape([2, channels])
            all_sums = ctx.all_gather(local_sums[None], axis=0)

            def backward(dy_np, x_np, mean_np, invstd_np, count_np, all_np, local_np,
                         *params_np):
                g, _ = _channel_params(params_np, flags)
                total = np.zeros_like(local_np)
                for part in all_np:  # replica order: the same bits on every replica
                    total += part
                dx = _aligned_empty(x_np.shape, x_np.dtype)
                if x_np.size:
                    stages.batch_norm_grad_input(dy_np, x_np, g, mean_np, invstd_np, total,
                                                 count_np, axis=axis, out=dx)
                return _param_grads(dx, local_np[1] * invstd_np, local_np[0], flags, params_np)

            return _gradient_op(
                backward, [dy, x, mean, invstd, count, all_sums, local_sums, *params], x,
                params, "numbabn_sync_grad")

        return (y, mean, var), grad

    y, mean, var = op(x, *params)
    return y, tf.stop_gradient(mean), tf.stop_gradient(var)
