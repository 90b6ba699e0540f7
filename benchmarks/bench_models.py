"""asv benchmarks of whole Keras models: fifty BN layers in a model, not one big shape.

`Models`: ``keras.applications`` ResNet50 and MobileNetV2 (``weights=None``, 64x64x3
inputs, 10 classes, batch 32), each cloned into variants with the same weights: the
stock Keras BN and numbabn's layer (``keras_layer.convert``); with NUMBABN_BENCH_FULL=1
also TF's fused op in a Keras layer and BN replaced by Identity (the bound). ``track_ms_*`` are the median ms of one
``train_on_batch`` / ``predict_on_batch``; ``track_speedup_vs_stock_*`` stock / numbabn;
``track_bn_cost_ratio_vs_fused_*`` numbabn's BN cost over the fused op's, a BN cost being
the variant's time minus the bound's.

Why ``track_`` and not ``time_``: the four variants must be timed in turns, in one
process (a model's step is ~0.1-1 s on a small machine, and load drifts), and building,
checking and tracing them takes ~2 minutes a model, too long to repeat in each of asv's
per-benchmark processes. So ``setup_cache`` (asv runs it once per commit, in one
process, and fails every benchmark of the class if it raises) builds both models,
checks the variants against the stock model (`_model_common.check_variants`) and times
them interleaved; each ``track_`` returns one figure of that measurement.

With NUMBABN_BENCH_SMALL=1 (the suite's run-once test) each model name stands for a
small model of the same kind, 32x32, batch 2, one round.
"""

import os

# Before Numba or TensorFlow load (see _common): spinning OpenMP threads left by one
# library's kernel slow the other library's next operation.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ._common import ASV_SETTINGS, SMALL_RUN, preimport_frameworks  # noqa: E402
from ._model_common import (  # noqa: E402
    MODELS, bn_cost_ratio, measure_model, speedup_vs_stock,
)

preimport_frameworks()  # once, in asv's forkserver (see _common)
rounds, repeat, warmup_time = (ASV_SETTINGS[k] for k in ("rounds", "repeat", "warmup_time"))

#: the timing: 3 rounds of >= 0.5 s blocks after 1 warm-up step (the check made the
#: first, tracing, call); 1 round of single steps when small
ROUNDS, MIN_BLOCK, WARMUP = (1, 0.0, 1) if SMALL_RUN else (3, 0.5, 1)
#: The variants timed per commit: stock and numbabn (the speed-up a user gets). The
#: fused-op and no-BN variants (numbabn's BN cost over the fused op's) double the
#: tracing and timing, ~100 of the class's ~210 s a commit on the 2-core machine: they
#: run with NUMBABN_BENCH_FULL=1, and in ``model_report.py`` (the README's model table).
FULL_RUN = os.environ.get("NUMBABN_BENCH_FULL") == "1"
MODEL_VARIANTS = ("stock", "numbabn", "fused", "no_bn") if FULL_RUN or SMALL_RUN else (
    "stock", "numbabn")
#: The models timed per commit: MobileNetV2 (52 BN layers between depthwise and 1x1
#: convolutions, where BN is a larger share of a step than in ResNet50, so a BN
#: regression shows more; ~60 s a commit). ResNet50 (~100 s more: tracing its train
#: step alone takes ~20 s a variant) with NUMBABN_BENCH_FULL=1 and in ``model_report.py``.
MODEL_NAMES = list(MODELS) if FULL_RUN or SMALL_RUN else ["mobilenetv2"]


def measure_models():
    """``{model: measure_model(model)}`` for every model of `MODEL_NAMES` (setup_cache).

    Without TensorFlow/Keras, ``{"skip": why}``: `Models.setup` then skips the class.
    Raises AssertionError if a variant disagrees with the stock model.
    """
    try:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
    except ImportError as exc:
        return {"skip": f"tensorflow/keras not importable: {exc}"}
    return {name: measure_model(name, rounds=ROUNDS, min_block=MIN_BLOCK, warmup=WARMUP,
                                variants=MODEL_VARIANTS)
            for name in MODEL_NAMES}


# ResNet50 and MobileNetV2, all four variants: ~2 min each to build, check and trace on 2
# cores, then ~1 min each of timing (about half with the two default variants)
measure_models.timeout = 1200


class Models:
    """ms per step of a model's variants (`MODEL_VARIANTS`), measured in turns in one
    process (see the module docstring)."""

    params = [MODEL_NAMES]
    param_names = ["model"]
    timeout = 1200

    setup_cache = staticmethod(measure_models)

    def setup(self, results, model):
        if "skip" in results:
            raise NotImplementedError(results["skip"])
        self.ms = results[model]["ms"]

    def track_ms_train_stock(self, results, model):
        return self.ms["train"]["stock"]

    def track_ms_train_numbabn(self, results, model):
        return self.ms["train"]["numbabn"]

    def track_ms_inference_stock(self, results, model):
        return self.ms["inference"]["stock"]

    def track_ms_inference_numbabn(self, results, model):
        return self.ms["inference"]["numbabn"]

    def track_speedup_vs_stock_train(self, results, model):
        return speedup_vs_stock(self.ms, "train")

    def track_speedup_vs_stock_inference(self, results, model):
        return speedup_vs_stock(self.ms, "inference")

    track_ms_train_stock.unit = "ms"
    track_ms_train_numbabn.unit = "ms"
    track_ms_inference_stock.unit = "ms"
    track_ms_inference_numbabn.unit = "ms"
    track_speedup_vs_stock_train.unit = "x"
    track_speedup_vs_stock_inference.unit = "x"


def _full_variant_figures():
    """The figures of the fused and no-BN variants, when they are measured."""

    def track_ms_train_fused(self, results, model):
        return self.ms["train"]["fused"]

    def track_ms_train_no_bn(self, results, model):
        return self.ms["train"]["no_bn"]

    def track_ms_inference_fused(self, results, model):
        return self.ms["inference"]["fused"]

    def track_ms_inference_no_bn(self, results, model):
        return self.ms["inference"]["no_bn"]

    def track_bn_cost_ratio_vs_fused_train(self, results, model):
        """(numbabn - no_bn) / (fused - no_bn); NaN if fused - no_bn <= 0 (noise)."""
        return bn_cost_ratio(self.ms, "train")

    def track_bn_cost_ratio_vs_fused_inference(self, results, model):
        return bn_cost_ratio(self.ms, "inference")

    for fn in (track_ms_train_fused, track_ms_train_no_bn, track_ms_inference_fused,
               track_ms_inference_no_bn):
        fn.unit = "ms"
        setattr(Models, fn.__name__, fn)
    for fn in (track_bn_cost_ratio_vs_fused_train, track_bn_cost_ratio_vs_fused_inference):
        fn.unit = "x"
        setattr(Models, fn.__name__, fn)


if "fused" in MODEL_VARIANTS:
    _full_variant_figures()
