"""keras_layer.BatchNormalization against the stock Keras layer: outputs, moving statistics
and gradients, for every layout and constructor option, eager and under tf.function."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

from keras_helpers import GRAD_TOL, LAYOUTS, OUT_TOL, assert_close  # noqa: E402

MODES = ["eager", "function"]


def check_step(ours_step, stock_step, x, w, what, out_tol=OUT_TOL, grad_tol=GRAD_TOL):
    """Run one step on both layers; outputs and [dx, dgamma?, dbeta?] must agree."""
    x = tf.constant(x)
    w = tf.constant(w)
    y_o, g_o = ours_step(x, w)
    y_s, g_s = stock_step(x, w)
    assert y_o.dtype == y_s.dtype and tuple(y_o.shape) == tuple(y_s.shape)
    assert_close(y_o, y_s, out_tol, f"{what}: outputs")
    assert len(g_o) == len(g_s)
    for k, (a, b) in enumerate(zip(g_o, g_s)):
        assert b is not None
        assert_close(a, b, grad_tol, f"{what}: gradient {k} of [x, gamma?, beta?]")
    return y_o, g_o


def train_and_infer(ours, stock, shape, mode, steps=3, seed=10, out_tol=OUT_TOL,
                    grad_tol=GRAD_TOL):
    """``steps`` training steps (outputs, gradients, every weight after each), then an
    inference step; the inputs shift between steps so the moving statistics move."""
    ours_train, stock_train = (kh.make_step(L, True, mode) for L in (ours, stock))
    for i in range(steps):
        x, w = kh.data(shape, seed + i, loc=0.5 + i, scale=1.0 + 0.5 * i)
        before = ours.moving_mean.numpy().copy()
        check_step(ours_train, stock_train, x, w, f"train step {i}", out_tol, grad_tol)
        kh.assert_weights_close(ours, stock, out_tol, f"after train step {i}:")
        # the step did update the statistics (else equality above proves little)
        assert not np.allclose(ours.moving_mean.numpy(), before)
    ours_inf, stock_inf = (kh.make_step(L, False, mode) for L in (ours, stock))
    x, w = kh.data(shape, seed + 100)
    snapshot = ours.get_weights()
    check_step(ours_inf, stock_inf, x, w, "inference", out_tol, grad_tol)
    for a, b in zip(snapshot, ours.get_weights()):
        np.testing.assert_array_equal(a, b)  # inference leaves the weights alone


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=kh.layout_id)
def test_layouts_match_stock(layout, mode):
    shape, axis = layout
    ours, stock = kh.make_pair(shape, axis=axis, momentum=0.7)
    train_and_infer(ours, stock, shape, mode)


def _initializers():
    # fresh instances per layer, seeded: both layers draw the same initial values
    return dict(
        gamma_initializer=keras.initializers.RandomUniform(0.5, 1.5, seed=1),
        beta_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=2),
        moving_mean_initializer=keras.initializers.RandomNormal(stddev=0.5, seed=3),
        moving_variance_initializer=keras.initializers.RandomUniform(0.5, 2.0, seed=4),
    )


OPTIONS = {
    "defaults": dict,
    "center_false": lambda: dict(center=False),
    "scale_false": lambda: dict(scale=False),
    "center_and_scale_false": lambda: dict(center=False, scale=False),
    "momentum_epsilon": lambda: dict(momentum=0.5, epsilon=1e-5),
    "momentum0_large_epsilon": lambda: dict(momentum=0.0, epsilon=0.5),
    "initializers": _initializers,
    # a single replica: the same statistics as unsynchronized (multi-replica runs are
    # tests/test_keras_sync.py's)
    "synchronized_one_replica": lambda: dict(synchronized=True, momentum=0.5),
    "float64_layer": lambda: dict(dtype="float64", momentum=0.5),
}

OPTIONS_LAYOUT = ((6, 3, 5, 4), 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("option", list(OPTIONS))
def test_constructor_options_match_stock(option, mode):
    shape, axis = OPTIONS_LAYOUT
    make_kwargs = OPTIONS[option]
    keras.utils.set_random_seed(0)
    ours = kh.OURS(axis=axis, **make_kwargs())
    stock = kh.STOCK(axis=axis, **make_kwargs())
    ours.build(shape)
    stock.build(shape)
    if option == "initializers":
        # the initializers ran: same (non-default) values in both, without any copy
        for a, b in zip(ours.get_weights(), stock.get_weights()):
            np.testing.assert_array_equal(a, b)
        assert not np.allclose(ours.gamma.numpy(), 1.0)
        assert not np.allclose(ours.moving_variance.numpy(), 1.0)
    else:
        kh.randomize(ours, 1)
        stock.set_weights(ours.get_weights())
    tols = {}
    if option == "float64_layer":
        assert ours.moving_mean.dtype == "float64" and ours.compute_dtype == "float64"
        # both compute in float64 throughout: agreement to float64 rounding of sums of
        # a few hundred terms (1e-10 leaves a wide margin; float32 anywhere gives 1e-7)
        tols = dict(out_tol=1e-10, grad_tol=1e-10)
    assert [v.name for v in ours.weights] == [v.name for v in stock.weights]
    train_and_infer(ours, stock, shape, mode, **tols)


def test_regularizers_losses_match_stock():
    shape = (8, 4)
    kwargs = dict(gamma_regularizer=keras.regularizers.L2(0.01),
                  beta_regularizer=keras.regularizers.L1(0.02))
    ours, stock = kh.make_pair(shape, **kwargs)
    x, _ = kh.data(shape, 3)
    ours(x, training=True)
    stock(x, training=True)
    assert len(ours.losses) == len(stock.losses) == 2
    for a, b in zip(ours.losses, stock.losses):
        assert float(a) > 0.0  # random gamma/beta: the penalty is not trivially zero
        np.testing.assert_allclose(float(a), float(b), rtol=1e-6)
    # and in a model, where fit() adds them to the loss
    inputs = keras.Input((4,))
    model = keras.Model(inputs, kh.OURS(**kwargs)(inputs))
    assert len(model.losses) == 2


@pytest.mark.parametrize("mode", MODES)
def test_constraints_applied_after_optimizer_step(mode):
    shape, axis = ((10, 3, 4), 1)

    def constraints():
        return dict(gamma_constraint=keras.constraints.NonNeg(),
                    beta_constraint=keras.constraints.MaxNorm(max_value=0.5, axis=0))

    keras.utils.set_random_seed(0)
    ours, stock = kh.OURS(axis=axis, **constraints()), kh.STOCK(axis=axis, **constraints())
    for L in (ours, stock):
        L.build(shape)
    kh.randomize(ours, 1)
    stock.set_weights(ours.get_weights())

    def train_step_fn(layer):
        # a large learning rate pushes some gamma below 0 and beta beyond the max norm
        opt = keras.optimizers.SGD(learning_rate=2.0)
        opt.build(kh.params(layer))
        step = kh.make_step(layer, True, "eager")

        def train_step(x, w):
            y, grads = step(x, w)
            opt.apply(grads[1:], kh.params(layer))
            return y, grads

        return tf.function(train_step) if mode == "function" else train_step

    ours_train, stock_train = train_step_fn(ours), train_step_fn(stock)
    for i in range(2):
        x, _ = kh.data(shape, 20 + i)
        # loss weights correlated with x, sign flipped per channel: dgamma = sum(w * xhat)
        # is large and positive for channels 0 and 2 (gamma driven below 0), negative
        # for channel 1
        w = x * np.array([1.0, -1.0, 1.0], np.float32)[None, :, None]
        check_step(ours_train, stock_train, x, w, f"step {i}")
        kh.assert_weights_close(ours, stock, GRAD_TOL, f"after optimizer step {i}:")
        # the constraints bit: some gamma clipped to exactly 0, beta at the max norm
        assert np.any(ours.gamma.numpy() == 0.0) and np.all(ours.gamma.numpy() >= 0.0)
        np.testing.assert_allclose(np.linalg.norm(ours.beta.numpy()), 0.5, rtol=1e-5)


RENORM = {
    "clipped": dict(renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3}),
    "unclipped": dict(renorm_clipping=None),
    "clipped_no_affine": dict(renorm_clipping={"rmax": 1.5, "rmin": 0.7, "dmax": 0.3},
                              center=False, scale=False),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("variant", list(RENORM))
def test_renorm_matches_stock(variant, mode):
    """Several steps of batch renormalization on shifting data: outputs, gradients, and
    moving_mean/variance/stddev, renorm_mean/stddev after each step."""
    shape, axis = ((6, 4, 5, 3), -1)
    kwargs = dict(renorm=True, renorm_momentum=0.6, momentum=0.7, axis=axis, **RENORM[variant])
    ours, stock = kh.make_pair(shape, **kwargs)
    names = [v.name for v in ours.weights]
    for extra in ("moving_stddev", "renorm_mean", "renorm_stddev"):
        assert extra in names
    ours_train, stock_train = (kh.make_step(L, True, mode) for L in (ours, stock))
    clipping = RENORM[variant]["renorm_clipping"]
    r_clipped = d_clipped = False
    for i, (loc, scale) in enumerate([(0.0, 1.0), (2.0, 3.0), (-1.0, 0.5), (0.5, 2.0)]):
        x, w = kh.data(shape, 30 + i, loc=loc, scale=scale)
        if clipping:
            # would the stock layer's correction be clipped on this batch?
            x64 = x.astype(np.float64).reshape(-1, shape[-1])
            std = np.sqrt(x64.var(0) + ours.epsilon)
            renorm_std = np.maximum(stock.renorm_stddev.numpy(), np.sqrt(ours.epsilon))
            r = std / renorm_std
            d = (x64.mean(0) - stock.renorm_mean.numpy()) / renorm_std
            r_clipped |= bool(np.any((r > clipping["rmax"]) | (r < clipping["rmin"])))
            d_clipped |= bool(np.any(np.abs(d) > clipping["dmax"]))
        check_step(ours_train, stock_train, x, w, f"renorm step {i}")
        kh.assert_weights_close(ours, stock, OUT_TOL, f"after renorm step {i}:")
    if clipping:
        assert r_clipped and d_clipped, "the clipping was never exercised"
    ours_inf, stock_inf = (kh.make_step(L, False, mode) for L in (ours, stock))
    x, w = kh.data(shape, 99)
    check_step(ours_inf, stock_inf, x, w, "renorm inference")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[4]], ids=kh.layout_id)
def test_trainable_false_is_inference_mode(layout, mode):
    """A frozen layer normalizes with its moving statistics even with training=True,
    leaves them unchanged, and still passes the stock layer's gradient to its inputs."""
    shape, axis = layout
    ours, stock = kh.make_pair(shape, axis=axis, momentum=0.5)
    ours.trainable = False
    stock.trainable = False
    assert ours.trainable_weights == [] and len(ours.non_trainable_weights) == 4
    before = ours.get_weights()
    x, w = kh.data(shape, 40)
    y_train, g = check_step(kh.make_step(ours, True, mode), kh.make_step(stock, True, mode),
                            x, w, "frozen, training=True")
    for a, b in zip(before, ours.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(before, stock.get_weights()):
        np.testing.assert_array_equal(a, b)
    y_inf = ours(x, training=False)
    np.testing.assert_array_equal(y_train.numpy(), y_inf.numpy())
    assert np.max(np.abs(g[0].numpy())) > 0.1  # the input gradient does flow
    # training=True on an unfrozen twin would give different outputs (batch statistics)
    twin, _ = kh.make_pair(shape, axis=axis, momentum=0.5)
    assert not np.allclose(twin(x, training=True).numpy(), y_inf.numpy(), atol=1e-3)


@pytest.mark.parametrize("layout", [((2, 3, 4, 3), -1), ((2, 3, 4, 5), 1)], ids=kh.layout_id)
def test_unknown_dimensions_under_tf_function(layout):
    """Every dimension but the channel unknown when traced (as in fit() with partial
    batches, or a SavedModel-style signature); one trace serves two input shapes."""
    shape, axis = layout
    spec = [None] * len(shape)
    spec[axis] = shape[axis]
    signature = [tf.TensorSpec(spec, tf.float32), tf.TensorSpec(spec, tf.float32)]
    ours, stock = kh.make_pair(shape, axis=axis, momentum=0.5)
    for training in (True, False):
        steps = [tf.function(kh.make_step(L, training, "eager"), input_signature=signature)
                 for L in (ours, stock)]
        for seed, s in enumerate([shape, tuple(d + 1 if a != axis % len(shape) else d
                                              for a, d in enumerate(shape))]):
            x, w = kh.data(s, 110 + seed)
            y, _ = check_step(*steps, x, w, f"training={training}, shape {s}")
            assert tuple(y.shape) == s
            kh.assert_weights_close(ours, stock, OUT_TOL, f"training={training}:")
        assert [step.experimental_get_tracing_count() for step in steps] == [1, 1]
