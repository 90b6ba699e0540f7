"""Helpers for the whole-model benchmarks (``bench_models.py``, ``model_report.py``).

Users run fifty BN layers inside a model, not one big shape. Each model of `MODELS`
(Keras applications, ``weights=None``, channels last, float32) is built once and
cloned into four variants with the same weights:

* ``stock``: the model as built (``keras.layers.BatchNormalization``);
* ``numbabn``: ``keras_layer.convert(model, to="numbabn")``;
* ``fused``: every BN replaced by `fused_bn_class` (a subclass of Keras's layer whose
  call runs ``tf.raw_ops.FusedBatchNormV3``, Keras's moving update);
* ``no_bn``: every BN replaced by ``keras.layers.Identity`` (`identity_class`): the
  bound, a model whose BN layers cost nothing.

`check_variants` compares predictions, the loss of one training step, the first BN
layer's moving statistics and the weight update (the gradient through every BN layer)
against the stock model, and raises AssertionError on a mismatch; then
`interleaved_medians` runs ``train_on_batch`` and ``predict_on_batch`` of every variant
in turns, round by round, and keeps the median per step. `measure_model` does all three.

asv imports every module here while discovering benchmarks: no ``time_*``/``track_*``
names. TensorFlow and Keras are imported inside the functions, so discovery stays fast.
"""

import gc
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before Numba/TF load: see _common
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from ._common import SMALL_RUN, settle_compiled_op  # noqa: E402

VARIANTS = ("stock", "numbabn", "fused", "no_bn")
MODES = ("train", "inference")
#: benchmark name -> keras.applications constructor (also the report's label)
MODELS = {"resnet50": "ResNet50", "mobilenetv2": "MobileNetV2"}
SEED = 20240601
LEARNING_RATE = 0.01

#: The issue's configuration: 64x64 RGB inputs, 10 classes, batch 32.
FULL = dict(size=64, batch=32, classes=10, tiny=False)
#: Smoke configuration (NUMBABN_BENCH_SMALL=1, ``model_report.py --quick``): each
#: model name stands for a small model of the same kind (`_tiny_model`), 32x32, batch 2,
#: so the suite's run-once test does not trace two 50-layer training graphs four times.
TINY = dict(size=32, batch=2, classes=10, tiny=True)
CONFIG = TINY if SMALL_RUN else FULL

#: Tolerances of `check_variants`, relative to the stock model's values (see there).
#: Measured at 64x64, batch 32 (numbabn, fused): logits 3.4e-5, 2.8e-5 (ResNet50) and
#: 1.0e-5, 1.1e-5 (MobileNetV2); loss <= 2.4e-6; first BN's moving statistics <= 8e-8
#: and recovered batch statistics <= 7.5e-6; weight update 0.022, 0.016 (ResNet50) and
#: 0.0096, 0.0014 (MobileNetV2), where the stock model fed an input one float32 ulp
#: away moves by 5e-5 (logits) and 0.019 (update) itself.
TOLERANCE = {"logits": 5e-4, "loss": 1e-4, "moving": 1e-4, "batch_stats": 1e-3,
             "update": 0.1}


# ------------------------------------------------------------------ the fused layer

_FUSED_CLASS, _IDENTITY_CLASS = [], []


def fused_bn_class():
    """``FusedBatchNormalization``: Keras's layer with ``tf.raw_ops.FusedBatchNormV3``.

    Defined on first use (Keras is imported lazily). Same constructor, weights and config
    as ``keras.layers.BatchNormalization``. Training: ``is_training=True`` (batch
    statistics; the op's registered gradient is ``FusedBatchNormGradV3``) and Keras's
    moving update ``moving * momentum + batch * (1 - momentum)`` with the *biased* batch
    variance (the op returns Bessel's, so it is scaled by (n - 1) / n); inference:
    ``is_training=False`` with the moving statistics. 4-D NHWC/NCHW float32 inputs, and
    2-D (N, C) ones as (N, 1, 1, C); no masks.
    """
    if _FUSED_CLASS:
        return _FUSED_CLASS[0]
    import keras
    import tensorflow as tf

    class FusedBatchNormalization(keras.layers.BatchNormalization):
        def call(self, inputs, training=None, mask=None):
            if mask is not None:
                raise NotImplementedError("FusedBatchNormalization takes no mask")
            rank = len(inputs.shape)
            axis = self.axis % rank
            x = tf.convert_to_tensor(inputs)
            if x.dtype != tf.float32:
                raise NotImplementedError("FusedBatchNormalization is float32 only here")
            if rank == 2 and axis == 1:
                x, axis = x[:, None, None, :], 3
            if len(x.shape) != 4 or axis not in (1, 3):
                raise NotImplementedError("FusedBatchNormalization: 4-D NHWC/NCHW or 2-D")
            fmt = "NHWC" if axis == 3 else "NCHW"
            c = x.shape[axis]
            gamma = (tf.convert_to_tensor(self.gamma) if self.scale
                     else tf.ones((c,), tf.float32))
            beta = (tf.convert_to_tensor(self.beta) if self.center
                    else tf.zeros((c,), tf.float32))
            fused = tf.raw_ops.FusedBatchNormV3
            if training and self.trainable:
                empty = tf.constant([], tf.float32)
                y, mean, var = fused(x=x, scale=gamma, offset=beta, mean=empty,
                                     variance=empty, epsilon=self.epsilon,
                                     data_format=fmt, is_training=True)[:3]
                n = tf.cast(tf.size(x) // c, tf.float32)
                var = var * ((n - 1.0) / n)  # Bessel's -> biased, as Keras averages
                m = self.momentum
                self.moving_mean.assign(self.moving_mean * m + mean * (1.0 - m))
                self.moving_variance.assign(self.moving_variance * m + var * (1.0 - m))
            else:
                y = fused(x=x, scale=gamma, offset=beta,
                          mean=tf.convert_to_tensor(self.moving_mean),
                          variance=tf.convert_to_tensor(self.moving_variance),
                          epsilon=self.epsilon, data_format=fmt, is_training=False)[0]
            if rank == 2:
                y = tf.reshape(y, tf.shape(inputs))
            return y

    _FUSED_CLASS.append(FusedBatchNormalization)
    return FusedBatchNormalization


def identity_class():
    """``BNRemoved``: ``keras.layers.Identity`` whose call also takes (and ignores) the
    ``training`` and ``mask`` arguments that a functional graph recorded for the BN layer
    it replaces (``keras.layers.Identity.call`` takes the inputs alone)."""
    if _IDENTITY_CLASS:
        return _IDENTITY_CLASS[0]
    import keras

    class BNRemoved(keras.layers.Identity):
        def call(self, inputs, training=None, mask=None):
            return inputs

        def compute_output_spec(self, inputs, training=None, mask=None):
            return super().compute_output_spec(inputs)

    _IDENTITY_CLASS.append(BNRemoved)
    return BNRemoved


# ------------------------------------------------------------------- building models

def _tiny_model(name, size, classes):
    """A small stand-in of the same kind as ``name`` (smoke runs only): a residual
    conv-BN net for resnet50, a depthwise-separable one with a nested Sequential block
    (to exercise the recursive clone and weight copy) for mobilenetv2."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3))
    x = layers.Conv2D(8, 3, strides=2, padding="same", use_bias=False, name="conv1")(inputs)
    x = layers.BatchNormalization(epsilon=1.001e-5, name="bn1")(x)
    x = layers.ReLU(name="relu1")(x)
    if name == "resnet50":
        for i in range(2):
            h = layers.Conv2D(8, 3, padding="same", name=f"b{i}_conv1")(x)
            h = layers.BatchNormalization(epsilon=1.001e-5, name=f"b{i}_bn1")(h)
            h = layers.ReLU(name=f"b{i}_relu")(h)
            h = layers.Conv2D(8, 3, padding="same", name=f"b{i}_conv2")(h)
            h = layers.BatchNormalization(epsilon=1.001e-5, name=f"b{i}_bn2")(h)
            x = layers.ReLU(name=f"b{i}_out")(layers.Add(name=f"b{i}_add")([x, h]))
    else:
        block = keras.Sequential([
            keras.Input(x.shape[1:]),
            layers.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw"),
            layers.BatchNormalization(momentum=0.999, name="dw_bn"),
            layers.ReLU(6.0, name="dw_relu"),
            layers.Conv2D(16, 1, use_bias=False, name="project"),
            layers.BatchNormalization(momentum=0.999, name="project_bn"),
        ], name="block")
        x = layers.ReLU(6.0, name="relu2")(block(x))
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = layers.Dense(classes, name="logits")(x)
    return keras.Model(inputs, outputs, name=f"tiny_{name}")


def leaf_layers(model):
    """Every layer of ``model``, nested Sequential/functional models walked through."""
    import keras

    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from leaf_layers(layer)
        else:
            yield layer


def bn_layers(model):
    import keras

    return [l for l in leaf_layers(model) if isinstance(l, keras.layers.BatchNormalization)]


def build_base(name, size, classes, tiny=False, batch=32):
    """The stock model, seeded, with non-trivial BN parameters and statistics.

    ``weights=None`` leaves gamma = 1, beta = 0, moving mean 0 and variance 1, which
    would make inference BN almost an identity and hide a wrong formula from the check:
    gamma and beta are drawn at random, then every moving statistic is set to the batch
    statistics of a calibration batch (one training-mode forward with momentum 0).
    The classifier gives logits (``classifier_activation=None``): a saturated softmax
    would hide differences from the check.
    """
    import keras

    keras.utils.set_random_seed(SEED)
    if tiny:
        model = _tiny_model(name, size, classes)
    else:
        ctor = getattr(keras.applications, MODELS[name])
        model = ctor(weights=None, input_shape=(size, size, 3), classes=classes,
                     classifier_activation=None)
    rng = np.random.default_rng(SEED)
    bns = bn_layers(model)
    for layer in bns:
        c = layer.gamma.shape[0]
        layer.gamma.assign(rng.uniform(0.5, 1.5, c).astype(np.float32))
        layer.beta.assign((0.1 * rng.standard_normal(c)).astype(np.float32))
    momenta = [layer.momentum for layer in bns]
    for layer in bns:
        layer.momentum = 0.0
    model(rng.standard_normal((batch, size, size, 3), dtype=np.float32), training=True)
    for layer, m in zip(bns, momenta, strict=True):
        layer.momentum = m
    return model


def copy_weights(src, dst):
    """Copy ``src``'s weights into its clone ``dst``, layer by layer, matched by name at
    each level of nesting; layers without weights in ``dst`` (Identity for BN) are left."""
    import keras

    by_name = {layer.name: layer for layer in src.layers}
    for new in dst.layers:
        if not new.weights:  # Identity for BN, input layers (renamed by the clone), ...
            continue
        old = by_name[new.name]
        if isinstance(new, keras.Model):
            copy_weights(old, new)
        else:
            new.set_weights(old.get_weights())


def _replace_bn(model, make):
    """Clone ``model`` with every BN layer replaced by ``make(layer)``, weights copied."""
    import keras

    def clone(layer):
        if isinstance(layer, keras.layers.BatchNormalization):
            return make(layer)
        return layer.__class__.from_config(layer.get_config())

    new = keras.models.clone_model(model, clone_function=clone, recursive=True)
    copy_weights(model, new)
    return new


def build_variants(base, variants=VARIANTS):
    """``{variant: model}`` for ``variants`` (of `VARIANTS`; "stock" is always built),
    all with ``base``'s weights, compiled (SGD,
    sparse categorical cross-entropy on logits, no XLA: Keras's "auto" turns it off on a
    CPU-only host anyway, and numbabn's layer cannot be compiled with it)."""
    import keras

    import keras_layer

    fused_cls, identity_cls = fused_bn_class(), identity_class()

    def fused(layer):
        config = layer.get_config()
        config.pop("fused", None)
        return fused_cls.from_config(config)

    make = {
        "numbabn": lambda: keras_layer.convert(base, to="numbabn"),
        "fused": lambda: _replace_bn(base, fused),
        "no_bn": lambda: _replace_bn(base, lambda layer: identity_cls(name=layer.name)),
    }
    models = {"stock": base}
    models.update({k: make[k]() for k in VARIANTS if k in variants and k != "stock"})
    for model in models.values():
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
    return models


def make_data(size, batch, classes):
    rng = np.random.default_rng(SEED + 1)
    return (rng.standard_normal((batch, size, size, 3), dtype=np.float32),
            rng.integers(0, classes, batch).astype(np.int32))


# ------------------------------------------------------------------------- the check

def _scaled_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def _relative_l2(got, want):
    """||got - want|| / ||want|| over lists of arrays (float64 sums)."""
    pairs = zip(got, want, strict=True)
    num = sum(float(np.sum((np.asarray(a, np.float64) - b) ** 2)) for a, b in pairs)
    den = sum(float(np.sum(np.asarray(b, np.float64) ** 2)) for b in want)
    return float(np.sqrt(num / den)) if den > 0 else float("inf")


def check_variants(models, x, y, tol=None):
    """Compare numbabn and fused with stock; raise AssertionError on a mismatch.

    Call on freshly built variants (identical weights); leaves each one step trained.
    Returns ``{quantity: {variant: error}}``, each error relative to the stock model's:

    * ``logits``: ``predict_on_batch`` (moving statistics; through ~50 BN layers and as
      many float32 convolutions), max |got - stock| / max |stock|;
    * ``loss``: one ``train_on_batch`` (batch statistics), |got - stock| / |stock|;
    * ``moving``: the first BN layer's moving mean and variance after that step (max
      |difference| / max |stock|, the worse of the two);
    * ``batch_stats``: the same for the batch statistics recovered from that update,
      ``(new - old * momentum) / (1 - momentum)``: the moving update alone moves the
      statistics by 1 - momentum (0.1 % for MobileNetV2), which would hide an error in
      the batch statistics from ``moving``;
    * ``update``: the change of all trainable weights in that step (SGD: learning rate x
      gradient, backpropagated through every BN layer), ||got - stock|| / ||stock||.

    Tolerances (`TOLERANCE`): float32 rounding, amplified by depth. At 64x64, batch 32,
    the randomly initialised networks turn an input change of one float32 ulp (2^-23
    relative) into 1e-5 (MobileNetV2) to 5e-5 (ResNet50) of the logits and ~2e-2 of the
    weight update (the backward of 50 layers at random initialisation is chaotic), and
    numbabn and fused differ from stock by about as much: logits are held to 5e-4 and
    updates to 0.1. A wrong formula (a missing epsilon or mean term, stale or unbiased
    statistics) moves these quantities by far more. The no_bn variant runs the same
    calls (tracing its functions) but is not compared.
    """
    tol = {**TOLERANCE, **(tol or {})}
    stock = models["stock"]
    first_bn = bn_layers(stock)[0].name

    def layer(model, layer_name):
        return next(l for l in leaf_layers(model) if l.name == layer_name)

    logits = {k: m.predict_on_batch(x) for k, m in models.items()}
    moving, updates, losses = {}, {}, {}
    for k, m in models.items():
        if k == "no_bn":
            m.train_on_batch(x, y)
            continue
        bn = layer(m, first_bn)
        before = [v.numpy() for v in m.trainable_variables]
        stats = [bn.moving_mean.numpy(), bn.moving_variance.numpy()]
        losses[k] = float(m.train_on_batch(x, y, return_dict=True)["loss"])
        moving[k] = (stats, [bn.moving_mean.numpy(), bn.moving_variance.numpy()])
        updates[k] = [v.numpy() - b for v, b in zip(m.trainable_variables, before,
                                                     strict=True)]
    momentum = layer(stock, first_bn).momentum

    def batch_stats(k):
        old, new = moving[k]
        return [(a.astype(np.float64) - b * momentum) / (1 - momentum)
                for a, b in zip(new, old)]

    errors, failures = {}, []
    for k in ("numbabn", "fused"):
        if k not in models:
            continue
        if [u.shape for u in updates[k]] != [u.shape for u in updates["stock"]]:
            raise AssertionError(f"{k}: trainable variables differ from the stock model's")
        got = {"logits": _scaled_error(logits[k], logits["stock"]),
               "loss": _scaled_error(losses[k], losses["stock"]),
               "moving": max(_scaled_error(a, b) for a, b in
                             zip(moving[k][1], moving["stock"][1])),
               "batch_stats": max(_scaled_error(a, b) for a, b in
                                  zip(batch_stats(k), batch_stats("stock"))),
               "update": _relative_l2(updates[k], updates["stock"])}
        for quantity, err in got.items():
            errors.setdefault(quantity, {})[k] = err
            if not err <= tol[quantity]:
                failures.append(f"{k} vs stock: {quantity} relative error {err:.3g} "
                                f"exceeds {tol[quantity]:.1g}")
    if failures:
        raise AssertionError(f"{stock.name}: the variants disagree with the stock model "
                             "(nothing was timed):\n  " + "\n  ".join(failures))
    settle_compiled_op()
    return errors


# ------------------------------------------------------------------------ the timing

def step_fns(models, x, y):
    """``{(variant, mode): fn}``: one ``train_on_batch`` / ``predict_on_batch`` each
    (both return NumPy values, so a call ends when its work has)."""
    fns = {}
    for k, m in models.items():
        fns[(k, "train")] = lambda m=m: m.train_on_batch(x, y)
        fns[(k, "inference")] = lambda m=m: m.predict_on_batch(x)
    return fns


def interleaved_medians(fns, rounds=7, min_block=0.5, warmup=2):
    """Median seconds per step of each ``fns`` entry, measured in turns.

    After ``warmup`` calls of each (tracing is done by then: `check_variants` made the
    first), every round times one block of consecutive steps of each entry, the entries
    in a rotated order each round, so a change of load on a shared machine hits all of
    them alike. A block has as many steps as make ``min_block`` seconds for the stock
    variant of that mode (at least 1), the same count for every variant of the mode.
    Returns ``({key: median s/step}, {key: [s/step of each round]})``.
    """
    keys = list(fns)
    first = {}
    for key in keys:
        for _ in range(warmup):
            t0 = time.perf_counter()
            fns[key]()
            first[key] = time.perf_counter() - t0
    steps = {}
    for key in keys:
        ref = first.get(("stock", key[1]), first[key])
        steps[key] = max(1, round(min_block / max(ref, 1e-9)))
    samples = {key: [] for key in keys}
    # The collector is off during each block (as timeit does). A full collection takes
    # ~0.5 s with Keras's and TF's objects around: the live objects are frozen out of
    # its reach first, so none is worth skipping per block.
    gc.collect()
    gc.freeze()
    try:
        for r in range(rounds):
            order = keys[r % len(keys):] + keys[:r % len(keys)]
            for key in order:
                fn, n = fns[key], steps[key]
                gc.disable()
                try:
                    t0 = time.perf_counter()
                    for _ in range(n):
                        fn()
                    samples[key].append((time.perf_counter() - t0) / n)
                finally:
                    gc.enable()
    finally:
        gc.unfreeze()
    return {key: statistics.median(v) for key, v in samples.items()}, samples


def summarize_rounds(median, samples, variants, modes):
    """``ms``, ``spread`` and ``paired`` of `interleaved_medians`' output.

    ``ms[mode][variant]``: median milliseconds per step; ``spread[mode][variant]``:
    (max - min) / median over the rounds. ``paired[mode]``: numbabn's speed-up over
    stock round by round, stock's block time over numbabn's *in the same round* (seconds
    apart, so a change of load between rounds, which moves the medians of both by 10-40 %
    on a shared machine, cancels): ``median``, ``low``, ``high`` of the per-round ratios
    and ``wins``, the rounds in which numbabn was faster, out of ``rounds``. With R
    rounds and no real difference, numbabn wins all R with probability 2**-R (a sign
    test), so "faster in 9 of 9 rounds" means something that a median ratio of 1.03
    alone does not. Empty when stock or numbabn was not timed.
    """
    ms = {mode: {k: 1e3 * median[(k, mode)] for k in variants} for mode in modes}
    spread = {mode: {k: (max(samples[(k, mode)]) - min(samples[(k, mode)]))
                     / median[(k, mode)] for k in variants} for mode in modes}
    paired = {}
    if "stock" in variants and "numbabn" in variants:
        for mode in modes:
            ratios = [s / n for s, n in zip(samples[("stock", mode)],
                                            samples[("numbabn", mode)])]
            paired[mode] = dict(median=statistics.median(ratios), low=min(ratios),
                                high=max(ratios), wins=sum(r > 1 for r in ratios),
                                rounds=len(ratios))
    return dict(ms=ms, spread=spread, paired=paired)


def paired_text(paired):
    """One table cell for `summarize_rounds`' ``paired[mode]``."""
    return (f"{paired['median']:.2f} ({paired['low']:.2f}-{paired['high']:.2f}), "
            f"{paired['wins']}/{paired['rounds']}")


def measure_model(name, size=None, batch=None, classes=None, tiny=None, rounds=7,
                  min_block=0.5, warmup=2, variants=VARIANTS):
    """Build, check and time one model's variants (`CONFIG` fills the defaults).

    Returns a plain dict (picklable, for asv's setup_cache): ``ms``, ``spread`` and
    ``paired`` (`summarize_rounds`), ``errors`` from `check_variants`, ``bn_layers``,
    the configuration, and ``seconds`` (build, check, timing) of wall time.
    """
    cfg = dict(CONFIG)
    cfg.update({k: v for k, v in dict(size=size, batch=batch, classes=classes,
                                      tiny=tiny).items() if v is not None})
    t0 = time.perf_counter()
    base = build_base(name, cfg["size"], cfg["classes"], cfg["tiny"], cfg["batch"])
    models = build_variants(base, variants)
    x, y = make_data(cfg["size"], cfg["batch"], cfg["classes"])
    t1 = time.perf_counter()
    errors = check_variants(models, x, y)
    t2 = time.perf_counter()
    median, samples = interleaved_medians(step_fns(models, x, y), rounds, min_block, warmup)
    t3 = time.perf_counter()
    return dict(model=name, **summarize_rounds(median, samples, models, MODES),
                errors=errors, config=cfg,
                rounds=rounds, bn_layers=len(bn_layers(base)),
                layers=len(list(leaf_layers(base))),
                seconds=dict(build=t1 - t0, check=t2 - t1, timing=t3 - t2))


def bn_cost_ratio(ms, mode):
    """numbabn's BN cost over the fused op's, each the variant's time minus no_bn's.

    NaN when the fused BN cost is not positive (noise on a tiny model)."""
    t = ms[mode]
    fused = t["fused"] - t["no_bn"]
    return (t["numbabn"] - t["no_bn"]) / fused if fused > 0 else float("nan")


def speedup_vs_stock(ms, mode):
    return ms[mode]["stock"] / ms[mode]["numbabn"]
