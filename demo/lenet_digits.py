"""LeNet with batch normalization, trained in Keras twice: stock BN layers, then numbabn's.

The classic LeNet-5 shape with a BatchNormalization after every convolution and hidden
dense layer, sigmoid activations (BN is what lets sigmoids train fast here):

    Conv2D(6, 5) BN sigmoid MaxPool(2) | Conv2D(16, 5) BN sigmoid MaxPool(2) | Flatten
    Dense(120) BN sigmoid | Dense(84) BN sigmoid | Dense(10)

It learns scikit-learn's bundled 8x8 digits (no download). Each image is upsampled 4x
to 32x32 (every pixel becomes a 4x4 block): 32x32 is LeNet-5's own input size, so the
unpadded 5x5 convolutions give the textbook 28x28x6 -> 14x14x6 -> 10x10x16 -> 5x5x16
feature maps, and nearest-neighbour repetition invents no pixel values.

The stock model is built once; ``keras_layer.convert(model, to="numbabn")`` gives the
same model with numbabn's BatchNormalization and identical weights. Both are compiled
and fitted the same way, with the same seed (so the same batch order). The final tables
show test accuracy and time per epoch, then the time of one training step of the BN
layers alone (each one, and all four together), stock vs numbabn, in the same process.

Run it:  ``make demo``, or ``python demo/lenet_digits.py`` where numbabn, keras_layer,
TensorFlow and scikit-learn are installed. About 30 s on 2 CPU cores; the first run
also compiles numbabn's kernels (~25-30 s here, cached on disk after), in its first epoch.
"""

import os

# Before TensorFlow or Numba load: idle OpenMP threads that spin steal the cores the
# other library needs next; and hide TensorFlow's start-up log lines.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import time  # noqa: E402
import timeit  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from keras import layers  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import keras_layer  # noqa: E402
from keras_layer import _native  # noqa: E402

SEED, EPOCHS, BATCH, LEARNING_RATE = 0, 10, 128, 1e-3
# Keras's default BN momentum, 0.99, leaves the moving statistics (what test-time
# inference uses) far behind the batch statistics after only ~110 steps.
BN_MOMENTUM = 0.8


def load_data():
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)          # (1797, 8, 8), in [0, 1]
    x = x.repeat(4, axis=1).repeat(4, axis=2)[..., None]   # (1797, 32, 32, 1)
    return train_test_split(x, digits.target, test_size=0.25, random_state=SEED,
                            stratify=digits.target)


def lenet_bn():
    def bn():
        return layers.BatchNormalization(momentum=BN_MOMENTUM)

    return keras.Sequential([
        keras.Input((32, 32, 1)),
        layers.Conv2D(6, 5), bn(), layers.Activation("sigmoid"), layers.MaxPooling2D(2),
        layers.Conv2D(16, 5), bn(), layers.Activation("sigmoid"), layers.MaxPooling2D(2),
        layers.Flatten(),
        layers.Dense(120), bn(), layers.Activation("sigmoid"),
        layers.Dense(84), bn(), layers.Activation("sigmoid"),
        layers.Dense(10),
    ], name="lenet_bn")


class EpochTimer(keras.callbacks.Callback):
    """Wall time of every epoch (the progress line's printing included)."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.start)


def fit(model, data):
    x_train, x_test, y_train, y_test = data
    keras.utils.set_random_seed(SEED)  # the same shuffling for both runs
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timer = EpochTimer()
    model.fit(x_train, y_train, batch_size=BATCH, epochs=EPOCHS, verbose=2,
              callbacks=[timer])
    _, accuracy = model.evaluate(x_test, y_test, batch_size=512, verbose=0)
    return accuracy, timer.seconds


def bn_shapes(model, batch):
    """The input shape of each BN layer, at this batch size."""
    return [(batch, *layer.input.shape[1:]) for layer in model.layers
            if isinstance(layer, layers.BatchNormalization)]


def best_of(fns, repeat=30):
    """Fastest of ``repeat`` timings of each zero-argument function, in seconds per call.

    The functions take turns, so a load change on the machine hits them all alike."""
    timers = {name: timeit.Timer(fn) for name, fn in fns.items()}
    numbers = {}
    for name, timer in timers.items():
        timer.timeit(1)  # trace the tf.function (and compile numbabn's kernels)
        numbers[name] = max(1, int(0.02 / timer.timeit(1)))  # ~20 ms per timing
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, timer in timers.items():
            best[name] = min(best[name], timer.timeit(numbers[name]) / numbers[name])
    return best


def bn_step(bn_class, shapes):
    """A tf.function running one training step of BN layers alone, one layer per shape:
    forward with batch statistics, moving-average update, backward to x, gamma, beta."""
    rng = np.random.default_rng(SEED)
    xs = [tf.constant(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    dys = [tf.constant(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    bns = [bn_class(momentum=BN_MOMENTUM) for _ in shapes]

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(xs)
            ys = [bn(x, training=True) for bn, x in zip(bns, xs)]
        params = [w for bn in bns for w in (bn.gamma, bn.beta)]
        return tape.gradient(ys, xs + params, output_gradients=dys)

    return step


def main():
    data = load_data()
    print(f"digits: {len(data[0])} train / {len(data[1])} test images, upsampled to "
          f"32x32; batch {BATCH}, {EPOCHS} epochs, Adam lr {LEARNING_RATE}, BN momentum "
          f"{BN_MOMENTUM}")

    keras.utils.set_random_seed(SEED)
    stock = lenet_bn()
    ours = keras_layer.convert(stock, to="numbabn")  # same layers and weights, our BN
    assert all(np.array_equal(a, b) for a, b in zip(stock.get_weights(), ours.get_weights()))

    results = {}
    for name, model, bn in [("stock", stock, "keras.layers"),
                            ("numbabn", ours, "keras_layer")]:
        print(f"\n--- {name}: LeNet with {bn}.BatchNormalization")
        results[name] = fit(model, data)

    shapes = bn_shapes(stock, BATCH)
    tf.get_logger().setLevel("ERROR")  # one tf.function per case: not a retracing problem
    cases = {str(shape): [shape] for shape in shapes}
    cases["all 4 in one tf.function"] = shapes
    steps = {(kind, case): bn_step(bn_class, case_shapes)
             for case, case_shapes in cases.items()
             for kind, bn_class in [("stock", layers.BatchNormalization),
                                    ("numbabn", keras_layer.BatchNormalization)]}
    seconds = best_of(steps)

    print(f"\n{'':36}{'stock':>10}{'numbabn':>10}")
    rows = [("test accuracy", lambda n: f"{results[n][0]:.2%}"),
            ("first epoch, with tracing + JIT (s)", lambda n: f"{results[n][1][0]:.2f}"),
            (f"epochs 2-{EPOCHS}, median per epoch (ms)",
             lambda n: f"{1e3 * np.median(results[n][1][1:]):.0f}")]
    for label, cell in rows:
        print(f"{label:36}{cell('stock'):>10}{cell('numbabn'):>10}")
    print("\nBN layers alone: one training step (forward + moving update + backward in a "
          "tf.function,\nbest of 30), ms, at the input shapes they see in this network:")
    print(f"  {'BN input':34}{'stock':>10}{'numbabn':>10}{'speed-up':>10}")
    for case in cases:
        stock_s, ours_s = seconds[("stock", case)], seconds[("numbabn", case)]
        print(f"  {case:34}{1e3 * stock_s:>10.2f}{1e3 * ours_s:>10.2f}"
              f"{stock_s / ours_s:>9.2f}x")
    print(f"numbabn's layer ran its kernels through: {_native.status()}. Each BN step is a "
          "few TensorFlow ops\n  around numbabn's kernels, where Keras's layer runs dozens "
          "of small ones (moments,\n  normalization, their gradients); benchmarks/"
          "model_report.py times whole models.")

if __name__ == "__main__":
    main()
