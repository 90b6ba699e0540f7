"""Synchronized batch norm under MirroredStrategy on two logical CPUs (run in a subprocess:
logical devices must be configured before TensorFlow starts). Prints one JSON line."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

import keras_layer  # noqa: E402


STRATEGY = None  # one per process: a second one's collectives clash with the first's


def run(cls, parts, wparts, momentum=0.0):
    global STRATEGY
    if STRATEGY is None:
        STRATEGY = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    strategy = STRATEGY
    channels = parts[0].shape[-1]
    with strategy.scope():
        layer = cls(synchronized=True, momentum=momentum)
        layer.build((None,) + parts[0].shape[1:])

    @tf.function
    def step(xr, wr):
        with tf.GradientTape() as tape:
            tape.watch(xr)
            y = layer(xr, training=True)
            loss = tf.reduce_sum(y * wr)
        return (y,) + tuple(tape.gradient(loss, [xr, layer.gamma, layer.beta]))

    def per_replica(values):
        return strategy.experimental_distribute_values_from_function(
            lambda ctx: tf.constant(values[ctx.replica_id_in_sync_group]))

    out = strategy.run(step, args=(per_replica(parts), per_replica(wparts)))
    local = [[t.numpy() for t in strategy.experimental_local_results(o)] for o in out]
    moving = [[v.numpy() for v in strategy.experimental_local_results(var)]
              for var in (layer.moving_mean._value, layer.moving_variance._value)]
    assert all(len(ms) == 2 and m.shape == (channels,) for ms in moving for m in ms), moving
    return dict(y=np.concatenate(local[0]), dx=np.concatenate(local[1]),
                dgamma=sum(local[2]), dbeta=sum(local[3]), moving=moving)


def single(x, w, momentum=0.0):
    layer = keras_layer.BatchNormalization(momentum=momentum)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, training=True)
        loss = tf.reduce_sum(y * w)
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    return dict(y=y.numpy(), dx=dx.numpy(), dgamma=dgamma.numpy(), dbeta=dbeta.numpy(),
                mean=layer.moving_mean.numpy(), var=layer.moving_variance.numpy())


def main():
    loc = float(sys.argv[1])
    rng = np.random.default_rng(0)
    x = (loc + rng.standard_normal((10, 4, 3))).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    split = 7  # unequal replica batches: 7 and 3 samples
    parts, wparts = [x[:split], x[split:]], [w[:split], w[split:]]
    ours = run(keras_layer.BatchNormalization, parts, wparts)
    stock = run(keras.layers.BatchNormalization, parts, wparts)
    ref = single(x, w)
    var64 = x.astype(np.float64).reshape(-1, 3).var(axis=0)
    report = {
        "replicas_agree_bitwise": all(np.array_equal(ms[0], ms[1]) for ms in ours["moving"]),
        "ours_var_rel_err": float(np.max(np.abs(ours["moving"][1][0] / var64 - 1))),
        "stock_var_rel_err": float(np.max(np.abs(stock["moving"][1][0] / var64 - 1))),
        "y_vs_single": float(np.max(np.abs(ours["y"] - ref["y"]))),
        "dx_vs_single": float(np.max(np.abs(ours["dx"] - ref["dx"]))),
        "dx_scale": float(np.max(np.abs(ref["dx"]))),
        "dgamma_vs_single": float(np.max(np.abs(ours["dgamma"] - ref["dgamma"]))),
        "dbeta_vs_single": float(np.max(np.abs(ours["dbeta"] - ref["dbeta"]))),
        "mean_vs_single": float(np.max(np.abs(ours["moving"][0][0] - ref["mean"]))),
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
