"""Drop-in details: the constructor's signature is the installed Keras's, an axis out of
range is a clear error, and inputs the numbabn kernels refuse but the stock layer takes
(negative moving variance, epsilon <= 0, rank-1 inputs, no channels) give the stock
layer's results."""

import keras_helpers as kh  # first: sets TF_CPP_MIN_LOG_LEVEL before TensorFlow loads

import inspect  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras  # noqa: E402

from keras_helpers import OUT_TOL, assert_close  # noqa: E402

MODES = ["eager", "function"]


def _stock_parameters():
    params = dict(inspect.signature(keras.layers.BatchNormalization.__init__).parameters)
    params.pop("self")
    return params


def test_signature_lists_every_stock_parameter():
    stock = _stock_parameters()
    for what, sig in [("class", inspect.signature(kh.OURS)),
                      ("__init__", inspect.signature(kh.OURS.__init__))]:
        ours = dict(sig.parameters)
        ours.pop("self", None)
        for name, p in stock.items():
            assert name in ours, f"{what}: no parameter {name!r} in {sig}"
            assert ours[name].kind == p.kind, (what, name, ours[name].kind, p.kind)
            assert ours[name].default == p.default or (
                ours[name].default is p.default), (what, name, ours[name].default, p.default)
        # the stock's order (positional use), then `fused`, keyword-only, before **kwargs
        assert [n for n in ours if n != "fused"] == list(stock), (what, sig)
        assert ours["fused"].kind is inspect.Parameter.KEYWORD_ONLY, (what, sig)
        assert ours["fused"].default is None
    # it is read from the installed Keras, not written out: a named, defaulted `axis` ...
    assert stock["axis"].default == inspect.signature(kh.OURS).parameters["axis"].default
    # ... and an instance's signature is its __call__'s, as for the stock layer
    assert inspect.signature(kh.OURS()) == inspect.signature(kh.STOCK())


def test_signature_binds_like_the_constructor():
    """What the signature accepts, the constructor accepts (and the reverse)."""
    sig = inspect.signature(kh.OURS)
    bound = sig.bind(1, 0.5, 1e-2, fused=True, name="bn")
    assert bound.arguments["axis"] == 1 and bound.arguments["kwargs"] == {"name": "bn"}
    with pytest.raises(TypeError):
        sig.bind(1, axis=2)
    with pytest.raises(TypeError):
        kh.OURS(1, axis=2)


@pytest.mark.parametrize("args,kwargs", [
    ((1,), {}),
    ((1, 0.5, 1e-2), {}),
    ((-1, 0.9, 1e-4, False, True), {"name": "bn_pos"}),
])
def test_positional_arguments_as_stock(args, kwargs):
    ours, stock = kh.OURS(*args, **kwargs), kh.STOCK(*args, **kwargs)
    assert ours.get_config() == {**stock.get_config(),
                                 "name": ours.name if "name" not in kwargs else kwargs["name"]}
    assert ours.axis == stock.axis and ours.momentum == stock.momentum
    assert ours.epsilon == stock.epsilon and ours.center == stock.center


@pytest.mark.parametrize("axis", [4, -5, 7])
@pytest.mark.parametrize("how", ["build", "call", "functional"])
def test_axis_out_of_range_is_a_value_error_naming_axis_and_shape(axis, how):
    """The stock layer fails with ``IndexError: tuple index out of range`` from build."""
    shape = (2, 3, 4, 5)
    layer = kh.OURS(axis=axis)
    if how == "build":
        attempt, seen = (lambda: layer.build(shape)), shape
    elif how == "call":
        attempt, seen = (lambda: layer(np.zeros(shape, np.float32))), shape
    else:
        attempt, seen = (lambda: layer(keras.Input(shape[1:]))), (None,) + shape[1:]
    with pytest.raises(ValueError) as info:
        attempt()
    message = str(info.value)
    assert f"axis {axis} " in message and str(tuple(seen)) in message, message
    assert not layer.built


def test_axis_out_of_range_list_axis():
    """A list axis (which Keras's ``compute_output_shape`` handles) is checked the same."""
    layer = kh.OURS()
    layer.axis = [1, 5]
    with pytest.raises(ValueError, match=r"axis 5 .*\(2, 3, 4\)"):
        layer.build((2, 3, 4))


def _run(layer, x, training, mode):
    fn = lambda x: layer(x, training=training)  # noqa: E731
    return (tf.function(fn) if mode == "function" else fn)(tf.constant(x)).numpy()


def assert_same_nan_and_close(got, expected, what):
    assert got.shape == expected.shape and got.dtype == expected.dtype, what
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(got), nan, err_msg=f"{what}: NaN positions")
    assert nan.any() and (~nan).any(), what  # a test that shows something
    assert_close(got[~nan], expected[~nan], OUT_TOL, what)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", [((6, 5), -1), ((4, 5, 6, 3), -1), ((4, 3, 5, 6), 1)],
                         ids=kh.layout_id)
def test_negative_moving_variance_in_inference_as_stock(layout, mode):
    """Weights from elsewhere (keras's own test_renorm_inference assigns random normal
    values to moving_variance): the stock layer gives NaN in the channels whose
    ``moving_variance + epsilon`` is negative and normal values elsewhere."""
    shape, axis = layout
    ours, stock = kh.make_pair(shape, axis=axis)
    weights = ours.get_weights()
    names = [v.name for v in ours.weights]
    var = weights[names.index("moving_variance")]
    var[::2] = -np.abs(var[::2]) - 0.5  # every other channel negative, beyond epsilon
    for layer in (ours, stock):
        layer.set_weights(weights)
    x, _ = kh.data(shape, 5)
    assert_same_nan_and_close(_run(ours, x, False, mode), _run(stock, x, False, mode),
                              "inference outputs")


def _check_as_stock(shape, mode, kwargs, seed=7):
    ours, stock = kh.make_pair(shape, momentum=0.5, **kwargs)
    for step, training in enumerate((True, True, False)):
        x, _ = kh.data(shape, seed + step)
        assert_close(_run(ours, x, training, mode), _run(stock, x, training, mode),
                     OUT_TOL, f"outputs, step {step}")
        kh.assert_weights_close(ours, stock, OUT_TOL, f"step {step}:")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("epsilon", [0.0, -1e-4])
def test_epsilon_not_positive_as_stock(epsilon, mode):
    """numbabn's kernels need epsilon > 0; the stock layer takes any float."""
    _check_as_stock((12, 3), mode, {"epsilon": epsilon})


@pytest.mark.parametrize("mode", MODES)
def test_rank1_inputs_as_stock(mode):
    """Rank-1 inputs: the stock layer treats every element as its own channel."""
    _check_as_stock((6,), mode, {})


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("training", [True, False])
def test_no_channels_as_stock(training, mode):
    ours, stock = kh.make_pair((4, 0), momentum=0.5)
    x = np.zeros((4, 0), np.float32)
    got, expected = _run(ours, x, training, mode), _run(stock, x, training, mode)
    assert got.shape == expected.shape == (4, 0) and got.dtype == expected.dtype
