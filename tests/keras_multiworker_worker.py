"""One worker of a 2-worker ``MultiWorkerMirroredStrategy`` training run with
``keras_layer.BatchNormalization(synchronized=True)``, or the single-process reference.

Usage::

    python keras_multiworker_worker.py multi OUT.npz   # TF_CONFIG names the cluster and task
    python keras_multiworker_worker.py single OUT.npz  # one process, the concatenated batches

Both train the same model (Dense -> synchronized BN -> ReLU -> Dense, SGD, fixed initial
weights) for ``len(SHARES)`` steps with a custom loop. Step ``s`` has a global batch of
``sum(SHARES[s])`` examples; worker ``i`` gets the ``SHARES[s][i]`` examples after those of
the workers before it (so the concatenation of the workers' shares, in worker order, is the
single process's batch). Each process writes its variables (weights, moving statistics) to
``OUT.npz`` under their paths, plus ``examples`` (its batch size at each step) and
``step_seconds`` (wall time of each step; the first includes tracing). With
``MW_DIE_AFTER_STEP=s`` a worker exits with status 3 after step ``s`` (the tests' dying
worker).

Run as a script only: the environment (threads, logging) must be set before TensorFlow starts.
"""

import json
import os
import sys
import time

SHARES = [(5, 3), (2, 7), (0, 6), (4, 0), (3, 5)]  # (worker 0, worker 1) examples per step
FEATURES, UNITS, OUTPUTS = 5, 6, 2
LEARNING_RATE = 0.1
MOMENTUM = 0.5  # of the moving statistics: they move visibly in a few steps
COLLECTIVE_TIMEOUT = 60.0  # seconds: a collective whose peer hangs fails instead of waiting


def global_batch(step):
    """The step's global batch (x, y), the same in every process."""
    import numpy as np

    rng = np.random.default_rng(1000 + step)
    n = sum(SHARES[step])
    x = (3.0 + 2.0 * rng.standard_normal((n, FEATURES))).astype(np.float32)
    y = rng.standard_normal((n, OUTPUTS)).astype(np.float32)
    return x, y


def share(step, worker):
    x, y = global_batch(step)
    start = sum(SHARES[step][:worker])
    stop = start + SHARES[step][worker]
    return x[start:stop], y[start:stop]


def initial_weights(model):
    import numpy as np

    rng = np.random.default_rng(0)
    # trainable weights from a fixed generator; moving statistics as initialized (0, 1)
    return [(rng.standard_normal(w.shape) * 0.5).astype(np.float32) if w.trainable
            else w.numpy() for w in model.weights]


def build(strategy):
    import keras
    import keras_layer

    with strategy.scope():
        model = keras.Sequential([
            keras.Input((FEATURES,)),
            keras.layers.Dense(UNITS),
            keras_layer.BatchNormalization(synchronized=True, momentum=MOMENTUM),
            keras.layers.ReLU(),
            keras.layers.Dense(OUTPUTS),
        ])
        optimizer = keras.optimizers.SGD(LEARNING_RATE)
        optimizer.build(model.trainable_variables)
    model.set_weights(initial_weights(model))
    return model, optimizer


def main():
    import numpy as np
    import tensorflow as tf

    mode, out = sys.argv[1], sys.argv[2]
    tf.config.threading.set_intra_op_parallelism_threads(1)
    if mode == "multi":
        comm = tf.distribute.experimental.CommunicationOptions(
            implementation=tf.distribute.experimental.CommunicationImplementation.RING,
            timeout_seconds=COLLECTIVE_TIMEOUT)
        worker = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
        print(f"worker {worker}: waiting for the cluster", file=sys.stderr, flush=True)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=comm)
        assert strategy.num_replicas_in_sync == 2, strategy.num_replicas_in_sync
        print(f"worker {worker}: strategy ready", file=sys.stderr, flush=True)
    else:
        strategy = tf.distribute.get_strategy()  # the default: one replica, no collectives
        worker = None
    model, optimizer = build(strategy)
    print("model built", file=sys.stderr, flush=True)

    def step_fn(x, y, global_n):
        with tf.GradientTape() as tape:
            pred = model(x, training=True)
            # each replica's share of the global mean: the strategy sums the gradients
            loss = tf.reduce_sum(tf.square(pred - y)) / tf.cast(global_n, tf.float32)
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))

    def dataset_fn(input_context):
        # worker i's pipeline (input_pipeline_id i) yields its share of each step's batch;
        # the single process's yields the whole batch
        part = (lambda s: global_batch(s)) if worker is None else (
            lambda s: share(s, input_context.input_pipeline_id))
        return tf.data.Dataset.from_generator(
            lambda: (part(s) for s in range(len(SHARES))),
            output_signature=(tf.TensorSpec([None, FEATURES], tf.float32),
                              tf.TensorSpec([None, OUTPUTS], tf.float32)))

    batches = iter(strategy.distribute_datasets_from_function(dataset_fn))

    @tf.function(input_signature=[batches.element_spec, tf.TensorSpec([], tf.int32)])
    def train_step(batch, global_n):
        strategy.run(step_fn, args=(*batch, global_n))

    times, examples = [], []
    for s in range(len(SHARES)):
        batch = next(batches)
        n = strategy.experimental_local_results(batch[0])[0].shape[0]
        t0 = time.perf_counter()
        train_step(batch, tf.constant(sum(SHARES[s])))
        times.append(time.perf_counter() - t0)
        examples.append(n)
        print(f"step {s} ({n} examples) {times[-1]:.3f} s", file=sys.stderr, flush=True)
        if os.environ.get("MW_DIE_AFTER_STEP") == str(s):  # the tests' dying worker
            print("dying on purpose", file=sys.stderr, flush=True)
            os._exit(3)
    weights = {w.path: np.asarray(w.numpy()) for w in model.weights}
    np.savez(out, step_seconds=np.array(times), examples=np.array(examples), **weights)
    print("done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    main()
