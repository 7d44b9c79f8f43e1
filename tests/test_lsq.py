"""LSQ / LSQ+ quantizer: forward, eq. 3-4 gradients, gradient scale, initialisations, axes."""
import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq import kernels
from tfq.quantizers import lsq
from tfq.quantizers.grid import UncalibratedError, UniformGrid


class _Holder(keras.layers.Layer):
    """A bare layer that owns quantizer variables, as tfmot's QuantizeWrapper does."""


def build(quantizer, shape, name="t"):
    layer = _Holder()
    weights = quantizer.build(tf.TensorShape(shape), name, layer)
    return layer, weights


def expected_grads(x, s, beta, n, p, upstream, g):
    """Eq. 3-4 written out element by element (independent of the implementation)."""
    dx, ds, db = np.zeros_like(x), 0.0, 0.0
    for i, (xi, ui) in enumerate(zip(x.ravel(), upstream.ravel())):
        v = (xi - beta) / s
        if v < n:
            ds += ui * n
            db += ui
        elif v > p:
            ds += ui * p
            db += ui
        else:
            dx.ravel()[i] = ui
            ds += ui * (np.round(v) - v)
    return dx, ds * g, db * g


@pytest.fixture(params=["fused", "tf_ops"])
def lsq_path(request, monkeypatch):
    """Training calls run through tfq's fused kernels ("fused") or TensorFlow's ops ("tf_ops")."""
    if request.param == "tf_ops":
        monkeypatch.setattr(kernels, "fusable", lambda *args: False)
    else:
        assert kernels.available(), "the fused kernels are not built: run `python -m tfq.kernels`"
    return request.param


@pytest.mark.parametrize("parameterization, k", [("linear", 1.0), ("log", 1.0), ("log", 10.0)])
@pytest.mark.parametrize("config", [1, 2, 3, 4])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gradients_match_eq3_eq4_for_every_configuration(config, bits, parameterization, k, lsq_path):
    signed, learn_offset = lsq.ACTIVATION_CONFIGS[config]
    n, p = lsq.qrange(bits, signed)
    s = 0.25
    beta = -0.25 if learn_offset else 0.0  # a whole number of steps (integer zero point 1)
    # values below, inside (off the rounding midpoints) and above the range
    v = np.array([n - 3.3, n - 0.7, n + 0.2, (n + p) / 2 + 0.3, p - 0.4, p + 0.6, p + 5.1], np.float64)
    x = (v * s + beta).astype(np.float32).reshape(1, -1)
    upstream = np.linspace(0.5, 2.0, x.size).astype(np.float32).reshape(1, -1)
    q = lsq.LSQQuantizer(bits=bits, signed=signed, learn_offset=learn_offset,
                         scale_parameterization=parameterization, scale_lr_multiplier=k)
    layer, weights = build(q, x.shape)
    q.assign_scale(weights, s)
    if learn_offset:
        weights["offset"].assign(beta)
    weights["initialized"].assign(True)
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = q(xt, training=True, weights=weights)
        loss = tf.reduce_sum(y * upstream)
    variables = [weights[q.scale_role]] + ([weights["offset"]] if learn_offset else [])
    grads = tape.gradient(loss, [xt] + variables)
    g = 1.0 / math.sqrt(x.size * p)
    dx, ds, db = expected_grads(x.astype(np.float64), s, beta, n, p, upstream.astype(np.float64), g)
    np.testing.assert_allclose(grads[0].numpy(), dx, atol=1e-6)
    # the log form trains u = log(s) / k: dL/du = k s dL/ds
    ds_stored = ds * s * k if parameterization == "log" else ds
    np.testing.assert_allclose(grads[1].numpy(), ds_stored, rtol=1e-5, atol=1e-6)
    if learn_offset:
        np.testing.assert_allclose(grads[2].numpy(), db, rtol=1e-5, atol=1e-6)
    # forward: eq. 2 by hand
    expected_y = np.clip(np.round(np.clip((x - beta) / s, n, p)), n, p) * s + beta
    np.testing.assert_allclose(y.numpy(), expected_y, atol=1e-6)


def test_gradient_scale_is_one_over_sqrt_n_p():
    q = lsq.LSQQuantizer(bits=3, signed=False, learn_offset=False)
    layer, weights = build(q, (None, 5, 4))
    x = tf.zeros((7, 5, 4))
    assert float(q.gradient_scale(x)) == pytest.approx(1 / math.sqrt(20 * 7))
    wq = lsq.weight_quantizer(4, per_axis=-1)
    layer, weights = build(wq, (3, 3, 8, 16))
    assert float(wq.gradient_scale(tf.zeros((3, 3, 8, 16)))) == pytest.approx(1 / math.sqrt(72 * 7))
    off = lsq.LSQQuantizer(bits=3, grad_scale=False)
    build(off, (None, 4))
    assert float(off.gradient_scale(tf.zeros((2, 4)))) == 1.0


def test_integer_offset_snaps_to_whole_steps_and_passes_gradient_through(lsq_path):
    q = lsq.LSQQuantizer(bits=4, signed=False, learn_offset=True)
    layer, weights = build(q, (None, 3))
    q.assign_scale(weights, 0.5)
    weights["offset"].assign(-0.6)  # -1.2 steps -> snapped to -1 step = -0.5
    weights["initialized"].assign(True)
    x = tf.constant([[0.0, 1.0, 100.0]])
    with tf.GradientTape() as tape:
        y = q(x, training=True, weights=weights)
        loss = tf.reduce_sum(y)
    np.testing.assert_allclose(y.numpy(), [[0.0, 1.0, 15 * 0.5 - 0.5]], atol=1e-6)
    d_offset = tape.gradient(loss, weights["offset"]).numpy()
    # one value above the range -> dbeta = 1 * g
    assert d_offset == pytest.approx(1 / math.sqrt(3 * 15))
    grid = q.integer_grid(weights)
    assert isinstance(grid, UniformGrid) and int(grid.zero_point) == 1 and (grid.qmin, grid.qmax) == (0, 15)


def test_weight_initialisations_per_output_channel():
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(3, 3, 4, 6)) * np.arange(1, 7)).astype(np.float32)
    flat = w.reshape(-1, 6)
    mu, sd = flat.mean(0), flat.std(0)
    expected = {
        "lsq+": np.maximum(np.abs(mu - 3 * sd), np.abs(mu + 3 * sd)) / 2 ** 3,
        "lsq": 2 * np.abs(flat).mean(0) / math.sqrt(7),
        "minmax": np.maximum(flat.max(0) / 7, flat.min(0) / -8),
    }
    for init, value in expected.items():
        q = lsq.weight_quantizer(4, per_axis=-1, init=init)
        layer, weights = build(q, w.shape)
        q(tf.constant(w), training=False, weights=weights)  # weights initialise on any call
        np.testing.assert_allclose(q.scale_numpy(weights), value, rtol=1e-4)


def test_depthwise_axes_and_dense_per_tensor():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(3, 3, 4, 2)).astype(np.float32) * np.array([1, 10], np.float32)
    q = lsq.weight_quantizer(4, per_axis=(2, 3), init="minmax")
    layer, weights = build(q, w.shape)
    q(tf.constant(w), training=False, weights=weights)
    assert weights[q.scale_role].shape == (4, 2)
    np.testing.assert_allclose(q.scale_numpy(weights),
                               np.maximum(w.max((0, 1)) / 7, w.min((0, 1)) / -8), rtol=1e-5)
    # the scheme picks the right axes per layer type
    scheme = tfq.schemes.get("lsq+")
    conv = keras.layers.Conv2D(4, 3)
    dw = keras.layers.DepthwiseConv2D(3, depth_multiplier=2)
    dense = keras.layers.Dense(3)
    assert scheme.quantizers.weight_quantizer(conv, 4).per_axis == (3,)
    assert scheme.quantizers.weight_quantizer(dw, 4).per_axis == (2, 3)
    assert scheme.quantizers.weight_quantizer(dense, 4).per_axis is None


@pytest.mark.parametrize("config", [1, 2, 3, 4])
def test_activation_init_mse_is_not_worse_than_minmax(config):
    rng = np.random.default_rng(2)
    pre = rng.normal(size=(64, 8, 8, 4)).astype(np.float32) * 2
    x = pre / (1 + np.exp(-pre))  # swish: skewed, heavy right tail
    x[0, 0, 0, 0] = 40.0  # an outlier that min-max follows
    errors = {}
    for init in ("minmax", "lsq+"):
        q = lsq.activation_quantizer(3, config=config, init=init)
        layer, weights = build(q, (None, 8, 8, 4))
        y = q(tf.constant(x), training=True, weights=weights)
        errors[init] = float(np.mean((y.numpy() - x) ** 2))
    assert errors["lsq+"] <= errors["minmax"]
    assert errors["lsq+"] < 0.5 * errors["minmax"]  # the outlier makes min-max far worse


def test_activation_minmax_init_is_eq7():
    x = np.linspace(-0.3, 2.7, 1000, dtype=np.float32).reshape(10, 100)
    q = lsq.activation_quantizer(2, config=4, init="minmax", integer_offset=False)
    layer, weights = build(q, (None, 100))
    q(tf.constant(x), training=True, weights=weights)
    s = (2.7 + 0.3) / 3
    assert q.scale_numpy(weights) == pytest.approx(s, rel=1e-5)
    assert weights["offset"].numpy() == pytest.approx(-0.3, abs=1e-5)  # beta = xmin - n*s, n = 0
    q1 = lsq.activation_quantizer(2, config=1, init="lsq")
    layer, weights = build(q1, (None, 100))
    q1(tf.constant(x), training=True, weights=weights)
    assert q1.scale_numpy(weights) == pytest.approx(2 * np.abs(x).mean() / math.sqrt(3), rel=1e-5)


def test_activation_init_waits_for_a_training_batch():
    q = lsq.activation_quantizer(4)
    layer, weights = build(q, (None, 3))
    q(tf.ones((2, 3)), training=False, weights=weights)
    assert not weights["initialized"].numpy()
    with pytest.raises(UncalibratedError):
        q.integer_grid(weights)
    q(tf.ones((2, 3)), training=True, weights=weights)
    assert weights["initialized"].numpy()
    before = q.scale_numpy(weights)
    q(10 * tf.ones((2, 3)), training=True, weights=weights)  # initialised once only
    assert q.scale_numpy(weights) == before


@pytest.mark.parametrize("kwargs, match", [
    (dict(bits=1), "bits must be an integer in \\[2, 8\\]"),
    (dict(bits=9), "bits must be an integer in \\[2, 8\\]"),
    (dict(bits=4.0), "bits must be an integer"),
    (dict(init="kaiming"), "init must be one of"),
    (dict(scale_parameterization="sqrt"), "scale_parameterization must be one of"),
    (dict(scale_lr_multiplier=0), "scale_lr_multiplier must be a number > 0"),
    (dict(scale_parameterization="linear", scale_lr_multiplier=10), "scale_lr_multiplier is for"),
    (dict(per_axis=-1), "per_axis is only supported for weight quantizers"),
    (dict(learn_offset=True, is_weight=True), "symmetric"),
])
def test_bad_arguments_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lsq.LSQQuantizer(**kwargs)


def test_bad_scheme_arguments_are_rejected():
    with pytest.raises(ValueError, match="activation_config must be one of"):
        tfq.schemes.get("lsq+", activation_config=5)
    with pytest.raises(ValueError, match="weight_bits must be an integer in"):
        tfq.schemes.get("lsq+", weight_bits=16)
    with pytest.raises(ValueError, match="Unknown method 'lsq-'"):
        tfq.schemes.get("lsq-")
    with pytest.raises(ValueError, match="init must be one of"):
        tfq.schemes.get("lsq+", init="uniform")
    with pytest.raises(ValueError, match="method='lsq' is LSQ\\+ configuration 1"):
        tfq.schemes.get("lsq", activation_config=3)


def test_serialisation_round_trip():
    q = lsq.LSQQuantizer(bits=3, signed=True, learn_offset=True, init="minmax")
    cfg = keras.utils.serialize_keras_object(q)
    with tfq.quantize_scope():
        again = keras.utils.deserialize_keras_object(cfg)
    assert again == q and again.qmin == -4 and again.qmax == 3
    assert tfq.quantizers.get("lsq", bits=2).bits == 2


def test_integer_offset_keeps_zero_on_the_grid():
    """z = clip(round(-beta/s), n, p): an offset beyond the range snaps to its end (int8 tensors
    need real 0 representable); the gradient still reaches beta."""
    q = lsq.LSQQuantizer(bits=2, signed=True, learn_offset=True)  # codes [-2, 1]
    layer, weights = build(q, (1, 3))
    q.assign_scale(weights, 0.25)
    weights["offset"].assign(-1.0)  # zero point 4, outside [-2, 1]
    weights["initialized"].assign(True)
    x = tf.constant([[-1.0, 0.0, 0.3]])
    with tf.GradientTape() as tape:
        y = q(x, training=True, weights=weights)
    # beta' = -z*s with z = 1: reals (c - 1) * 0.25 for c in [-2, 1] -> [-0.75, 0]
    np.testing.assert_allclose(y.numpy(), [[-0.75, 0.0, 0.0]], atol=1e-7)
    assert q.integer_grid(weights).zero_point == 1
    assert tape.gradient(y, weights["offset"]) is not None


@pytest.mark.parametrize("parameterization", ["linear", "log"])
def test_adam_steps_on_a_small_weight_scale(parameterization):
    """Adam moves its variable by about lr per step whatever the gradient's size: on a linear
    scale of 1e-3 ten steps of Adam(5e-4) drive it to the 1e-8 floor; on log s each step is a
    relative change of at most about lr (exp(+-lr))."""
    rng = np.random.default_rng(3)
    w = tf.constant(np.abs(rng.normal(size=(3, 3, 2, 4))).astype(np.float32) + 0.5)
    q = lsq.weight_quantizer(8, per_axis=-1, scale_parameterization=parameterization)
    layer, weights = build(q, w.shape)
    q.assign_scale(weights, np.full((4,), 1e-3, np.float32))
    weights["initialized"].assign(True)
    optimizer = keras.optimizers.Adam(5e-4)
    variable = weights[q.scale_role]
    for _ in range(10):
        with tf.GradientTape() as tape:
            # every value clips at the top of the range -> ds = p * g > 0 each step: s shrinks
            loss = tf.reduce_sum(q(w, training=True, weights=weights))
        optimizer.apply_gradients([(tape.gradient(loss, variable), variable)])
    s = q.scale_numpy(weights)
    if parameterization == "linear":
        np.testing.assert_allclose(s, 1e-8)
    else:
        assert np.all(s <= 1e-3) and np.all(s >= 1e-3 * math.exp(-10 * 5e-4 * 1.001))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_configurations_3_and_4_hold_the_same_grids_but_scale_them_about_different_codes(bits):
    """With a learned integer zero point a signed grid (codes -2^(b-1)..2^(b-1)-1) and an unsigned one
    (0..2^b-1) reach the same levels, and the MSE initialisation starts both at the same grid. Eq. 3
    moves s about code 0 (the middle of the signed range, the bottom of the unsigned one), so
    ds/g differs by -2^(b-1) per clipped element: ds3/g3 = ds4/g4 - 2^(b-1) dbeta/g (docs/lsq_plus.md)."""
    rng = np.random.default_rng(3)
    pre = rng.normal(size=(32, 6, 6, 4)).astype(np.float32) * 2
    x = tf.constant(pre / (1 + np.exp(-pre)))
    found = {}
    for config in (3, 4):
        q = lsq.activation_quantizer(bits, config=config)  # log s: d/d(log s) = s d/ds
        layer, weights = build(q, (None, 6, 6, 4))
        q(x, training=True, weights=weights)  # MSE initialisation
        with tf.GradientTape() as tape:
            y = q(x, training=True, weights=weights)
            loss = tf.reduce_sum(y * tf.sin(x))
        d_log_s, d_beta = tape.gradient(loss, [weights[q.scale_role], weights["offset"]])
        g = 1 / math.sqrt(6 * 6 * 4 * q.qmax)
        s = q.scale_numpy(weights)
        found[config] = (q.integer_grid(weights), y.numpy(), float(d_log_s) / (s * g), float(d_beta) / g)
    (grid3, y3, ds3, db3), (grid4, y4, ds4, db4) = found[3], found[4]
    assert float(grid3.scale) == pytest.approx(float(grid4.scale), rel=1e-6)
    assert int(grid3.zero_point) - grid3.qmin == int(grid4.zero_point) - grid4.qmin  # real 0 on the same code
    np.testing.assert_allclose(y3, y4, atol=1e-5 * float(grid3.scale))
    assert db3 == pytest.approx(db4, rel=1e-4)
    assert abs(db4) > 1.0  # some elements are clipped, so the two scale gradients differ
    assert ds3 == pytest.approx(ds4 - 2 ** (bits - 1) * db4, rel=1e-4)
