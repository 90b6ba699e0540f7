"""Train a small batch-normalized MLP twice: with numbabn's BN and with plain NumPy BN.

numbabn drops into the batch-normalization layer of a network written in plain NumPy.
A float32 MLP (64 -> 256 -> 256 -> 10: two Linear -> BN -> ReLU blocks, softmax
cross-entropy, SGD with momentum) learns scikit-learn's bundled 8x8 digits (no
download) twice, with the same seed, initialization and batch order: once with
``NumbaBN`` (numbabn's functions), once with ``NumpyBN`` (the textbook
``(x - mean) / sqrt(var + eps) * gamma + beta`` and its closed-form backward). The math
is the same, so the two runs should agree to rounding; the final table compares test
accuracy, time per training epoch and time inside the BN layers. Evaluation uses the
moving statistics (inference mode), updated with momentum 0.9 (Keras convention,
``moving = 0.9 * moving + 0.1 * batch``; a short run's choice).

Run it:  ``make demo``  (creates .venv, installs numbabn[demo], runs this), or
``python demo/mlp_digits.py`` where numbabn and scikit-learn are installed.

Threads: OpenBLAS (NumPy), OpenMP (scikit-learn) and Numba's OpenMP layer each keep a
pool whose idle threads spin, taking the cores the others need; with this many small
calls that made epochs many times slower, and erratic, on a 2-core machine. So, unless you
set them yourself, this script sets ``OMP_WAIT_POLICY=PASSIVE`` and, as the matrices
here are too small to gain from BLAS threads, ``OPENBLAS_NUM_THREADS=1``.
"""

import os

THREAD_SETTINGS = {"OMP_WAIT_POLICY": "PASSIVE", "OPENBLAS_NUM_THREADS": "1"}
for _name, _value in THREAD_SETTINGS.items():  # before NumPy or any OpenMP runtime loads
    os.environ.setdefault(_name, _value)

import time  # noqa: E402

import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

import numbabn as nbn  # noqa: E402

SEED, EPOCHS, BATCH, HIDDEN = 0, 20, 64, 256
LR, MOMENTUM, BN_MOMENTUM, EPS = 0.05, 0.9, 0.9, 1e-3


class BatchNorm:
    """Per-feature BN over a (batch, features) array; subclasses supply the math."""

    def __init__(self, features):
        self.gamma = np.ones(features, np.float32)
        self.beta = np.zeros(features, np.float32)
        self.moving_mean = np.zeros(features, np.float32)
        self.moving_var = np.ones(features, np.float32)
        self.seconds = 0.0  # time spent in forward(training=True) + backward


class NumbaBN(BatchNorm):
    def forward(self, x, training):
        if not training:
            return nbn.batch_norm_inference(x, self.gamma, self.beta, self.moving_mean,
                                            self.moving_var, eps=EPS)
        t = time.perf_counter()
        y, self.stats = nbn.batch_norm_train(x, self.gamma, self.beta, eps=EPS)
        nbn.update_moving_stats(self.moving_mean, self.moving_var, self.stats, BN_MOMENTUM)
        self.x = x
        self.seconds += time.perf_counter() - t
        return y

    def backward(self, dy):
        t = time.perf_counter()
        dx, dgamma, dbeta = nbn.batch_norm_backward(dy, self.x, self.gamma, self.stats)
        grads = [dgamma.astype(np.float32), dbeta.astype(np.float32)]  # float64 -> params'
        self.seconds += time.perf_counter() - t
        return dx, grads


class NumpyBN(BatchNorm):
    def forward(self, x, training):
        if not training:
            invstd = 1.0 / np.sqrt(self.moving_var + EPS)
            return (x - self.moving_mean) * invstd * self.gamma + self.beta
        t = time.perf_counter()
        mean, var = x.mean(axis=0), x.var(axis=0)
        self.invstd = 1.0 / np.sqrt(var + np.float32(EPS))
        self.xhat = (x - mean) * self.invstd
        m = np.float32(BN_MOMENTUM)
        self.moving_mean[...] = self.moving_mean * m + mean * (1 - m)
        self.moving_var[...] = self.moving_var * m + var * (1 - m)
        y = self.xhat * self.gamma + self.beta
        self.seconds += time.perf_counter() - t
        return y

    def backward(self, dy):
        t = time.perf_counter()
        n = dy.shape[0]
        dbeta = dy.sum(axis=0)
        dgamma = (dy * self.xhat).sum(axis=0)
        dx = (self.gamma * self.invstd / n) * (n * dy - dbeta - self.xhat * dgamma)
        self.seconds += time.perf_counter() - t
        return dx, [dgamma, dbeta]


class MLP:
    """Linear -> BN -> ReLU -> Linear -> BN -> ReLU -> Linear; BN is pluggable."""

    def __init__(self, bn_class, sizes, seed):
        rng = np.random.default_rng(seed)
        self.weights = [(rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(np.float32)
                        for a, b in zip(sizes[:-1], sizes[1:])]
        self.bias = np.zeros(sizes[-1], np.float32)  # only the last Linear: BN has beta
        self.bns = [bn_class(b) for b in sizes[1:-1]]
        bn_params = [p for bn in self.bns for p in (bn.gamma, bn.beta)]
        self.params = self.weights + [self.bias] + bn_params
        self.velocity = [np.zeros_like(p) for p in self.params]

    def forward(self, x, training):
        self.inputs, self.relus = [x], []
        for w, bn in zip(self.weights, self.bns):
            h = np.maximum(bn.forward(x @ w, training), 0)
            self.relus.append(h > 0)
            self.inputs.append(x := h)
        return x @ self.weights[-1] + self.bias

    def backward(self, dlogits):
        grads_w = [self.inputs[-1].T @ dlogits]
        grad_b, grads_bn = dlogits.sum(axis=0), []
        d = dlogits @ self.weights[-1].T
        for i in reversed(range(len(self.bns))):
            d, g = self.bns[i].backward(d * self.relus[i])
            grads_bn = g + grads_bn
            grads_w.insert(0, self.inputs[i].T @ d)
            d = d @ self.weights[i].T
        return grads_w + [grad_b] + grads_bn

    def sgd_step(self, grads):
        for p, v, g in zip(self.params, self.velocity, grads):
            v *= MOMENTUM
            v -= LR * g
            p += v


def softmax_cross_entropy(logits, labels):
    """Mean loss and its gradient with respect to the logits."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    loss = -np.log(p[np.arange(n), labels] + 1e-12).mean()
    p[np.arange(n), labels] -= 1
    return float(loss), p / n


def train_epoch(model, x, y, rng):
    """One pass over the data in shuffled mini-batches (the last partial batch dropped)."""
    order, losses = rng.permutation(len(x)), []
    for start in range(0, len(x) - BATCH + 1, BATCH):
        idx = order[start:start + BATCH]
        loss, dlogits = softmax_cross_entropy(model.forward(x[idx], training=True), y[idx])
        model.sgd_step(model.backward(dlogits))
        losses.append(loss)
    return float(np.mean(losses))


def warm_up():
    """One call of each numbabn function on a tiny batch: compiles or loads the kernels."""
    t = time.perf_counter()
    x, g, mm, mv = np.ones((8, 4), np.float32), *(np.ones(4, np.float32) for _ in range(3))
    y, stats = nbn.batch_norm_train(x, g, g)
    nbn.update_moving_stats(mm, mv, stats)
    nbn.batch_norm_backward(y, x, g, stats)
    nbn.batch_norm_inference(x, g, g, mm, mv)
    return time.perf_counter() - t


def main():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)  # pixel values 0..16 -> [0, 1]
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target)
    print(f"digits: {len(x_train)} train / {len(x_test)} test, MLP 64-{HIDDEN}-{HIDDEN}-10, "
          f"batch {BATCH}, {EPOCHS} epochs, float32\nSGD lr {LR} momentum {MOMENTUM}, BN "
          f"moving-stats momentum {BN_MOMENTUM}, "
          + ", ".join(f"{name}={os.environ[name]}" for name in THREAD_SETTINGS))
    print(f"numbabn warm-up (JIT compile or disk-cache load): {warm_up():.2f} s, "
          "excluded from all timings below")

    runs = {name: dict(model=MLP(cls, [64, HIDDEN, HIDDEN, 10], SEED),
                       rng=np.random.default_rng(SEED), epoch_s=[])
            for name, cls in [("numbabn", NumbaBN), ("numpy", NumpyBN)]}
    print(f"\n{'epoch':>5}  {'loss numbabn / numpy':>21}  {'test acc numbabn / numpy':>25}")
    for epoch in range(1, EPOCHS + 1):
        loss, acc = {}, {}
        for name, r in runs.items():
            t = time.perf_counter()
            loss[name] = train_epoch(r["model"], x_train, y_train, r["rng"])
            r["epoch_s"].append(time.perf_counter() - t)
            r["pred"] = r["model"].forward(x_test, training=False).argmax(axis=1)
            acc[name] = r["acc"] = float((r["pred"] == y_test).mean())
        print(f"{epoch:5d}  {loss['numbabn']:10.4f} / {loss['numpy']:.4f}  "
              f"{acc['numbabn']:13.2%} / {acc['numpy']:.2%}")

    nb, npy = runs["numbabn"], runs["numpy"]
    bn_s = [sum(bn.seconds for bn in r["model"].bns) for r in (nb, npy)]
    table = [("", "numbabn", "numpy"),
             ("final test accuracy", f"{nb['acc']:.2%}", f"{npy['acc']:.2%}"),
             ("mean time per training epoch (ms)", *(f"{1e3 * np.mean(r['epoch_s']):.1f}"
                                                      for r in (nb, npy))),
             ("BN layers, fwd+bwd, total (ms)", *(f"{1e3 * s:.1f}" for s in bn_s))]
    print()
    for label, a, b in table:
        print(f"{label:34}{a:>10}{b:>10}")
    print(f"BN speed-up of numbabn over NumPy: {bn_s[1] / bn_s[0]:.2f}x (training forward + "
          f"backward, both BN layers, all epochs;\n  each call normalizes a {BATCH}x{HIDDEN} "
          "batch, small enough that per-call overhead, not arithmetic, dominates)")
    differ = int((nb["pred"] != npy["pred"]).sum())
    gap = abs(nb["acc"] - npy["acc"])
    print(f"agreement: test accuracies differ by {gap:.2%}, predictions differ on {differ} "
          f"of {len(y_test)} test images\n  (same math, so only rounding differs)")


if __name__ == "__main__":
    main()
