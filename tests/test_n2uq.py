"""N2UQ quantizers: eq. 12 forward on the 8-bit input grid, G-STE gradients (eq. 11, 13), the
learning-rate factor, the entropy-preserving weight quantizer, integer grids and the scheme."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq import configs, schemes
from tfq.quantizers import lsq, n2uq
from tfq.quantizers.grid import ThresholdGrid, UncalibratedError, UniformGrid


class _Holder(keras.layers.Layer):
    """A bare layer that owns quantizer variables, as tfmot's QuantizeWrapper does."""


def build(quantizer, shape, name="t"):
    layer = _Holder()
    return layer, quantizer.build(tf.TensorShape(shape), name, layer)


# 8-bit input grid used by the hand-made cases: s8 = 1/64, zero point 64, reals [-1, 191/64]
S8, Z8 = 1.0 / 64.0, 64


def set_activation(q, weights, start, lengths, beta1=1.0, beta2=1.0, s8=S8, z8=Z8):
    """Assign effective parameter values (stored values are value / param_lr_scale)."""
    k = q.param_lr_scale
    weights["start"].assign(start / k)
    weights["lengths"].assign(np.asarray(lengths, np.float32) / k)
    weights["beta1"].assign(beta1 / k)
    weights["beta2"].assign(beta2 / k)
    weights["input_scale"].assign(s8)
    weights["input_offset"].assign(-z8 * s8)
    weights["initialized"].assign(True)


def on_grid(codes, s8=S8, z8=Z8):
    """Reals exactly on the 8-bit input grid."""
    return ((np.asarray(codes, np.float64) - z8) * s8).astype(np.float32)


def surrogate_gradients(x, start, lengths, beta1, beta2, bits, upstream):
    """Eq. 11 and 13 written out element by element (segments (d_{i-1}, d_i], official code)."""
    interval = 2.0 / (2 ** bits - 1)
    ends = np.concatenate([[start], start + np.cumsum(lengths)])
    dx, dstart, dlengths, dbeta1 = np.zeros_like(x), 0.0, np.zeros(len(lengths)), 0.0
    for idx, (xi, ui) in enumerate(zip(x.ravel(), upstream.ravel())):
        xs = beta1 * xi
        for i in range(1, len(ends)):
            if ends[i - 1] < xs <= ends[i]:
                a = lengths[i - 1]
                g = ui * beta2
                dx.ravel()[idx] = g * interval / a * beta1
                dstart += -g * interval / a
                dbeta1 += g * interval / a * xi
                dlengths[i - 1] += -g * interval * (xs - ends[i - 1]) / a ** 2
                for j in range(i - 1):
                    dlengths[j] += -g * interval / a
    return dx, dstart, dlengths, dbeta1


# --- activation quantizer: forward ------------------------------------------------------------
def test_at_initialisation_equals_uniform_rounding_on_0_2():
    for bits in (2, 3, 4):
        q = n2uq.N2UQActivationQuantizer(bits)
        _, w = build(q, (None, 64))
        rng = np.random.default_rng(bits)
        q(tf.constant(rng.uniform(-0.5, 2.6, (8, 64)), tf.float32), training=True, weights=w)  # calibrates
        p = q.parameters(w)
        assert p["start"] == 0.0 and p["beta1"] == pytest.approx(1.0) and p["beta2"] == pytest.approx(1.0)
        np.testing.assert_allclose(p["lengths"], 2.0 / (2 ** bits - 1), rtol=1e-6)
        x = rng.uniform(-0.5, 2.6, (16, 64)).astype(np.float32)
        y = q(tf.constant(x), training=False, weights=w).numpy()
        s8, z8 = p["input_scale"], p["input_zero_point"]
        x8 = (np.clip(np.round(x / s8) + z8, 0, 255) - z8) * s8       # the 8-bit input value
        interval = 2.0 / (2 ** bits - 1)
        v = x8 / interval
        away = np.abs(v - np.floor(v) - 0.5) > 1e-4                   # not on a midpoint
        assert away.mean() > 0.99
        expected = np.clip(np.round(v), 0, 2 ** bits - 1) * interval
        np.testing.assert_allclose(y[away], expected[away], atol=1e-6)
        assert set(np.round(y / interval).astype(int).ravel()) == set(range(2 ** bits))


def test_data_init_starts_equal_to_the_fitted_lsq_plus_quantizer():
    bits, n = 3, 7
    rng = np.random.default_rng(4)
    data = (rng.normal(0.0, 1.0, (16, 128)) * 1.5).astype(np.float32)
    swish = data / (1 + np.exp(-data))                               # negative values down to -0.28
    q = n2uq.N2UQActivationQuantizer(bits, init="data")
    _, w = build(q, (None, 128))
    q(tf.constant(swish), training=True, weights=w)
    fit = lsq.activation_quantizer(bits, config=4, init="lsq+")._init_activation(tf.constant(swish))
    s, z = float(fit["scale"]), int(np.round(-float(fit["offset"]) / float(fit["scale"])))
    assert z > 0                                                      # negative values are kept
    p = q.parameters(w)
    assert p["beta1"] == pytest.approx(2 / n / s, rel=1e-5) and p["beta2"] == pytest.approx(s * n / 2, rel=1e-5)
    assert p["start"] == pytest.approx(-z * 2 / n, rel=1e-5) and p["output_zero_point"] == z
    x = rng.uniform(-0.4, 3.0, (8, 128)).astype(np.float32)
    y = q(tf.constant(x), training=False, weights=w).numpy()
    s8, z8 = p["input_scale"], p["input_zero_point"]
    x8 = (np.clip(np.round(x / s8) + z8, 0, 255) - z8) * s8
    v = x8 / s + z                                                    # LSQ+ eq. 2 with beta = -z s
    away = np.abs(v - np.floor(v) - 0.5) > 1e-3
    expected = (np.clip(np.round(v), 0, n) - z) * s
    np.testing.assert_allclose(y[away], expected[away], rtol=1e-5, atol=1e-6)
    grid = q.integer_grid(w)
    assert grid.out_zero_point == z
    reals = grid.input_grid.dequantize(np.arange(256)).astype(np.float32)
    y_codes = q(tf.constant(reals[None]), training=False, weights=w).numpy()[0]
    np.testing.assert_allclose(y_codes, grid.dequantize(grid.code_table()), rtol=1e-6, atol=1e-7)
    # the output zero point is a constant; beta2 receives (level - z) * interval
    got = _gradients(q, w, x, np.ones_like(x))
    np.testing.assert_allclose(got["beta2"], np.sum(y) / p["beta2"], rtol=1e-4)


def test_thresholds_at_segment_midpoints_eq12_and_ties_take_the_lower_level():
    q = n2uq.N2UQActivationQuantizer(2, param_lr_scale=1.0)
    _, w = build(q, (None, 256))
    # T = d_{k-1} + a_k/2 = 0.25, 0.75, 1.5 -> input codes 80, 112, 160 (exact on the grid)
    set_activation(q, w, start=0.0, lengths=[0.5, 0.5, 1.0])
    codes = np.arange(256)
    y = q(tf.constant(on_grid(codes)[None]), training=False, weights=w).numpy()[0]
    expected_level = np.select([codes <= 80, codes <= 112, codes <= 160], [0, 1, 2], 3)
    np.testing.assert_array_equal(np.round(y * 1.5).astype(int), expected_level)
    grid = q.integer_grid(w)
    np.testing.assert_array_equal(grid.code_table(), expected_level)


# --- activation quantizer: G-STE gradients ---------------------------------------------------
def _gradients(q, w, x, upstream):
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(q(xt, training=True, weights=w) * upstream)
    names = ["start", "lengths", "beta1", "beta2"]
    grads = tape.gradient(loss, [xt] + [w[n] for n in names])
    return {"x": grads[0].numpy(), **{n: g.numpy() for n, g in zip(names, grads[1:])}}


@pytest.mark.parametrize("beta1, beta2", [(1.0, 1.0), (1.25, 0.8)])
def test_input_gradient_is_interval_over_a_i_inside_and_zero_outside(beta1, beta2):
    q = n2uq.N2UQActivationQuantizer(2, param_lr_scale=1.0)
    _, w = build(q, (None, 12))
    start, lengths = 0.1, [0.2, 0.5, 0.3]           # ends 0.1, 0.3, 0.8, 1.1
    set_activation(q, w, start, lengths, beta1, beta2)
    xs = np.array([-0.6, 0.05, 0.15, 0.25, 0.31, 0.6, 0.79, 0.85, 1.05, 1.2, 2.0, 2.5])  # in beta1*x units
    x = on_grid(np.round(xs / beta1 / S8) + Z8)[None]
    g = _gradients(q, w, x, np.ones_like(x))["x"][0]
    interval = 2.0 / 3.0
    ends = np.array([0.1, 0.3, 0.8, 1.1])
    expected = np.zeros(x.shape[1])
    for i, v in enumerate(beta1 * x[0].astype(np.float64)):
        seg = np.searchsorted(ends, v, side="left")   # 1..3 inside
        if 1 <= seg <= 3:
            expected[i] = beta2 * beta1 * interval / lengths[seg - 1]
    assert (expected > 0).sum() >= 6 and (expected == 0).sum() >= 4
    np.testing.assert_allclose(g, expected, rtol=1e-5)


@pytest.mark.parametrize("bits", [2, 3])
def test_parameter_gradients_match_eq13(bits):
    n = 2 ** bits - 1
    rng = np.random.default_rng(bits)
    lengths = rng.uniform(0.1, 0.5, n)
    start, beta1, beta2 = -0.15, 1.3, 0.7
    q = n2uq.N2UQActivationQuantizer(bits, param_lr_scale=1.0)
    x = on_grid(rng.integers(0, 256, (3, 40)))
    upstream = rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
    _, w = build(q, (None, 40))
    set_activation(q, w, start, lengths.astype(np.float32), beta1, beta2)
    got = _gradients(q, w, x, upstream)
    lengths32 = lengths.astype(np.float32).astype(np.float64)
    dx, dstart, dlengths, dbeta1 = surrogate_gradients(x.astype(np.float64), start, lengths32, beta1, beta2,
                                                       bits, upstream.astype(np.float64))
    np.testing.assert_allclose(got["x"], dx, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["start"], dstart, rtol=1e-4)
    np.testing.assert_allclose(got["lengths"], dlengths, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["beta1"], dbeta1, rtol=1e-4)
    # beta2 receives the forward levels times the interval
    y = q(tf.constant(x), training=False, weights=w).numpy()
    np.testing.assert_allclose(got["beta2"], np.sum(upstream * y) / beta2, rtol=1e-5)
    assert np.all(dlengths != 0)


def test_length_gradient_equals_finite_difference_of_the_surrogate():
    """d/da_i of the expected output E (eq. 11's surrogate) by central differences."""
    bits, start, lengths, beta1 = 2, 0.05, np.array([0.3, 0.45, 0.35]), 1.1
    q = n2uq.N2UQActivationQuantizer(bits, param_lr_scale=1.0)
    x = on_grid(np.arange(40, 200, 3))[None]
    _, w = build(q, x.shape)
    set_activation(q, w, start, lengths.astype(np.float32), beta1)
    got = _gradients(q, w, x, np.ones_like(x))["lengths"]

    def surrogate_sum(a):
        ends = np.concatenate([[start], start + np.cumsum(a)])
        xs = beta1 * x.astype(np.float64).ravel()
        total = 0.0
        for v in xs:
            for i in range(1, len(ends)):
                if ends[i - 1] < v <= ends[i]:
                    total += (2 / 3) * ((v - ends[i - 1]) / a[i - 1] + i - 1)
            total += 2.0 if v > ends[-1] else 0.0
        return total

    a32 = lengths.astype(np.float32).astype(np.float64)
    for i in range(3):
        e = np.zeros(3)
        e[i] = 1e-6
        fd = (surrogate_sum(a32 + e) - surrogate_sum(a32 - e)) / 2e-6
        assert got[i] == pytest.approx(fd, rel=1e-3)


def test_lengths_below_min_get_no_gradient_and_act_as_min():
    q = n2uq.N2UQActivationQuantizer(2, param_lr_scale=1.0)
    x = on_grid(np.arange(64, 200))[None]
    _, w = build(q, x.shape)
    set_activation(q, w, 0.0, [0.5, 5e-4, 0.8])
    assert q.parameters(w)["lengths"][1] == pytest.approx(n2uq.MIN_LENGTH)
    g = _gradients(q, w, x, np.ones_like(x))["lengths"]
    assert g[1] == 0.0 and g[0] != 0.0 and g[2] != 0.0
    # a segment just above the minimum does get a gradient
    set_activation(q, w, 0.0, [0.5, 2e-3, 0.8])
    assert _gradients(q, w, x, np.ones_like(x))["lengths"][1] != 0.0


# --- learning-rate factor --------------------------------------------------------------------
def test_param_lr_scale_moves_thresholds_by_lr_times_scale_with_sgd_and_adam():
    rng = np.random.default_rng(0)
    x = on_grid(rng.integers(60, 200, (4, 30)))
    upstream = tf.constant(rng.uniform(-1, 1, x.shape), tf.float32)
    lengths = [0.3, 0.6, 0.4]

    def step(k, optimizer):
        q = n2uq.N2UQActivationQuantizer(2, param_lr_scale=k)
        _, w = build(q, x.shape)
        set_activation(q, w, 0.1, lengths, 1.2, 0.9)
        before = q.parameters(w)
        roles = ["start", "lengths", "beta1", "beta2"]
        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(q(tf.constant(x), training=True, weights=w) * upstream)
        grads = tape.gradient(loss, [w[r] for r in roles])
        optimizer.apply_gradients(zip(grads, [w[r] for r in roles]))
        after = q.parameters(w)
        return before, after, {r: g.numpy() for r, g in zip(roles, grads)}

    lr = 0.05
    b1, a1, g1 = step(1.0, keras.optimizers.SGD(lr))
    b2, a2, g2 = step(0.1, keras.optimizers.SGD(lr))
    for role in g1:  # the stored variable receives dL/dp, whatever the factor
        np.testing.assert_allclose(g2[role], g1[role], rtol=1e-6)
    assert g1["start"] != 0.0
    for role in ("start", "beta1", "beta2"):
        assert a1[role] - b1[role] == pytest.approx(-lr * g1[role], rel=1e-4)
        assert a2[role] - b2[role] == pytest.approx(-0.1 * lr * g1[role], rel=1e-4)
    np.testing.assert_allclose(a2["thresholds"] - b2["thresholds"],
                               0.1 * (a1["thresholds"] - b1["thresholds"]), rtol=1e-4, atol=1e-9)
    # Adam's first step is lr * sign(g): the factor still scales it
    b3, a3, _ = step(0.1, keras.optimizers.Adam(lr))
    assert a3["start"] - b3["start"] == pytest.approx(-0.1 * lr * np.sign(g1["start"]), rel=1e-3)


# --- activation quantizer: integer grid ------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_code_table_equals_keras_forward_on_every_input_code(bits):
    n = 2 ** bits - 1
    rng = np.random.default_rng(10 + bits)
    q = n2uq.N2UQActivationQuantizer(bits)
    _, w = build(q, (None, 256))
    data = rng.normal(0.6, 0.7, (32, 256)).astype(np.float32)
    q(tf.constant(data), training=True, weights=w)   # calibrates the 8-bit input grid (zero point != 0)
    k = q.param_lr_scale
    w["start"].assign(-0.07 / k)
    w["lengths"].assign(rng.uniform(0.05, 0.4, n).astype(np.float32) * 3 / n / k)
    w["beta1"].assign(1.37 / k)
    w["beta2"].assign(0.61 / k)
    grid = q.integer_grid(w)
    assert isinstance(grid, ThresholdGrid) and grid.out_zero_point == 0 and grid.bits == bits
    ig = grid.input_grid
    assert ig.bits == 8 and (ig.qmin, ig.qmax) == (0, 255) and ig.zero_point != 0
    reals = ig.dequantize(np.arange(256)).astype(np.float32)   # every input code's real value
    y = q(tf.constant(reals[None]), training=False, weights=w).numpy()[0]
    table = grid.code_table()
    np.testing.assert_array_equal(np.round(y / grid.out_scale).astype(int), table)
    np.testing.assert_allclose(y, table * grid.out_scale, rtol=1e-6)
    assert grid.out_scale == pytest.approx(0.61 * 2 / n, rel=1e-6)
    assert len(set(table)) > 2


def test_grid_needs_data():
    q = n2uq.N2UQActivationQuantizer(2)
    _, w = build(q, (None, 4))
    with pytest.raises(UncalibratedError):
        q.integer_grid(w)
    q(tf.zeros((2, 4)), training=False, weights=w)  # inference does not calibrate activations
    with pytest.raises(UncalibratedError):
        q.integer_grid(w)


# --- weight quantizer ------------------------------------------------------------------------
def hand_weight_quantize(w, axes, bits):
    reduce = tuple(a for a in range(w.ndim) if a not in axes)
    s = (2 ** bits - 1) / 2 ** (bits - 1) * np.mean(np.abs(w), axis=reduce, keepdims=True)
    n = 2 ** bits - 1
    c = np.round((np.clip(w / s, -1, 1) + 1) * n / 2)
    return s * (c * 2 / n - 1), np.squeeze(s, axis=reduce)


@pytest.mark.parametrize("layer, shape", [
    (keras.layers.Conv2D(4, 3), (3, 3, 2, 4)),
    (keras.layers.DepthwiseConv2D(3, depth_multiplier=2), (3, 3, 3, 2)),
    (keras.layers.Dense(5), (6, 5)),
])
def test_weight_statistic_per_output_channel_and_forward(layer, shape):
    q = schemes.N2UQQuantizers().weight_quantizer(layer, 3)
    axes = configs.PER_CHANNEL_AXES[type(layer).__name__]
    assert isinstance(q, n2uq.N2UQWeightQuantizer) and tuple(q.get_config()["per_axis"]) == axes
    rng = np.random.default_rng(1)
    magnitude = np.arange(1, int(np.prod([shape[a] for a in axes])) + 1).reshape([shape[a] for a in axes])
    bshape = [shape[a] if a in axes else 1 for a in range(len(shape))]
    w = (rng.normal(size=shape) * magnitude.reshape(bshape)).astype(np.float32)
    _, v = build(q, shape, "kernel")
    y = q(tf.constant(w), training=True, weights=v).numpy()
    expected, s = hand_weight_quantize(w.astype(np.float64), axes, 3)
    np.testing.assert_allclose(v["scale"].numpy(), s, rtol=1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


def test_weight_gradient_is_straight_through_without_clip_mask():
    q = n2uq.N2UQWeightQuantizer(2, per_axis=-1)
    w = tf.constant(np.random.default_rng(2).normal(size=(3, 3, 2, 4)) * 3, tf.float32)
    _, v = build(q, w.shape)
    with tf.GradientTape() as tape:
        tape.watch(w)
        y = q(w, training=True, weights=v)
        unscaled = y / tf.reshape(v["scale"], [1, 1, 1, 4])  # the official code's W_q/S
        loss = tf.reduce_sum(y)
    s = v["scale"].numpy()
    assert np.any(np.abs(w.numpy()) > s)   # some weights are clipped
    np.testing.assert_array_equal(tape.gradient(loss, w).numpy(), np.ones(w.shape))
    with tf.GradientTape() as tape:
        tape.watch(w)
        loss = tf.reduce_sum(q(w, training=True, weights=v) / tf.stop_gradient(tf.reshape(s, [1, 1, 1, 4])))
    np.testing.assert_allclose(tape.gradient(loss, w).numpy(), np.broadcast_to(1 / s, w.shape), rtol=1e-6)
    assert np.all(np.isin(np.round(unscaled.numpy() * 3).astype(int), [-3, -1, 1, 3]))


def entropy(codes):
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("bits", [2, 3])
def test_entropy_higher_than_max_abs_scaling(bits):
    w = np.random.default_rng(5).normal(size=(3, 3, 64, 8)).astype(np.float32)
    q = n2uq.N2UQWeightQuantizer(bits)
    _, v = build(q, w.shape)
    y = q(tf.constant(w), training=True, weights=v).numpy()
    n = 2 ** bits - 1
    max_abs = np.max(np.abs(w), axis=(0, 1, 2), keepdims=True)
    baseline_codes = np.round((w / max_abs + 1) * n / 2)
    n2uq_codes = np.round(y / v["scale"].numpy() * n)
    h_n2uq = np.mean([entropy(n2uq_codes[..., c]) for c in range(8)])
    h_max = np.mean([entropy(baseline_codes[..., c]) for c in range(8)])
    assert h_n2uq > h_max + 0.3
    assert h_n2uq > 0.9 * bits   # close to the maximum of `bits` bits


def test_weight_grid_holds_odd_codes_and_matches_the_inference_forward():
    bits = 3
    q = n2uq.N2UQWeightQuantizer(bits, per_axis=(2, 3))
    w = np.random.default_rng(6).normal(size=(3, 3, 4, 2)).astype(np.float32)
    _, v = build(q, w.shape)
    q(tf.constant(w), training=True, weights=v)
    # the kernel moves after the last training call: inference and grid both use the stored S
    y = q(tf.constant(w * 1.3), training=False, weights=v).numpy()
    grid = q.integer_grid(v)
    assert isinstance(grid, UniformGrid)
    assert (grid.bits, grid.qmin, grid.qmax, grid.axis) == (bits + 1, -7, 7, (2, 3))
    assert np.all(grid.zero_point == 0) and grid.scale.shape == (4, 2)
    codes = grid.quantize(y)
    assert np.all(codes % 2 == 1)
    np.testing.assert_allclose(grid.dequantize(codes), y, rtol=1e-6, atol=1e-7)
    assert float(q.effective_bits(v)) == bits   # costs count b bits, not the grid's b + 1
    assert grid.to_int8_container()[2:] == (-7, 7)


def test_weight_quantizer_initialises_on_an_inference_call():
    q = n2uq.N2UQWeightQuantizer(2)
    w = np.random.default_rng(7).normal(size=(5, 3)).astype(np.float32)
    _, v = build(q, w.shape)
    with pytest.raises(UncalibratedError):
        q.integer_grid(v)
    y = q(tf.constant(w), training=False, weights=v).numpy()
    np.testing.assert_allclose(y, hand_weight_quantize(w.astype(np.float64), (1,), 2)[0], rtol=1e-5, atol=1e-6)


# --- arguments and serialisation -------------------------------------------------------------
@pytest.mark.parametrize("make, match", [
    (lambda: n2uq.N2UQActivationQuantizer(1), "bits"),
    (lambda: n2uq.N2UQActivationQuantizer(9), "bits"),
    (lambda: n2uq.N2UQActivationQuantizer(2, param_lr_scale=0), "param_lr_scale"),
    (lambda: n2uq.N2UQActivationQuantizer(2, param_lr_scale="0.1"), "param_lr_scale"),
    (lambda: n2uq.N2UQActivationQuantizer(2, input_init="mse"), "input_init"),
    (lambda: n2uq.N2UQActivationQuantizer(2, init="lsq"), "init must be one of"),
    (lambda: schemes.N2UQScheme(init="uniform"), "init must be one of"),
    (lambda: n2uq.N2UQWeightQuantizer(8), r"bits must be an integer in \[2, 7\]"),
    (lambda: schemes.N2UQScheme(weight_bits=8), "weight_bits"),
    (lambda: schemes.N2UQScheme(param_lr_scale=-1), "param_lr_scale"),
    (lambda: tfq.quantize_model(tfq.models.small_cnn(width=4), "n2uq", activation_bits=9), "activation_bits"),
])
def test_bad_arguments_are_rejected(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_serialisation_round_trip():
    for q in (n2uq.N2UQActivationQuantizer(3, param_lr_scale=0.2, input_init="minmax", init="data"),
              n2uq.N2UQWeightQuantizer(4, per_axis=(2, 3))):
        restored = keras.utils.deserialize_keras_object(keras.utils.serialize_keras_object(q))
        assert type(restored) is type(q) and restored.get_config() == q.get_config()
    assert tfq.quantizers.get("n2uq", bits=3).bits == 3


# --- scheme, end to end ----------------------------------------------------------------------
def quantizer_map(model):
    """{(float layer name, "weight" | "output"): quantizer}"""
    found = {}
    for layer in model.layers:
        name = layer.name[len("quant_"):] if layer.name.startswith("quant_") else layer.name
        for _, quantizer, _ in getattr(layer, "_weight_vars", []) or []:
            found[(name, "weight")] = quantizer
        outputs = getattr(layer, "_output_quantizers", None)
        if outputs:
            found[(name, "output")] = outputs[0]
        if type(layer).__name__ == "QuantizeLayer":
            found[(name, "output")] = layer.quantizer
    return found


def n2uq_model(seed=0, **options):
    keras.utils.set_random_seed(seed)
    net = tfq.models.small_cnn(width=8)
    return tfq.quantize_model(net, method="n2uq", weight_bits=2, activation_bits=2, **options)


def test_scheme_places_n2uq_on_inner_layers_and_lsq_at_8_bits():
    q = n2uq_model(param_lr_scale=0.5)
    found = quantizer_map(q)
    weights = {name: quant for (name, role), quant in found.items() if role == "weight"}
    assert isinstance(weights["block1_conv"], lsq.LSQQuantizer) and weights["block1_conv"].bits == 8
    assert isinstance(weights["logits"], lsq.LSQQuantizer) and weights["logits"].bits == 8
    for name in ("block2_conv", "block3_conv"):
        assert isinstance(weights[name], n2uq.N2UQWeightQuantizer) and weights[name].bits == 2
    activations = {name for (name, role), quant in found.items()
                   if role == "output" and isinstance(quant, n2uq.N2UQActivationQuantizer)}
    assert activations == {"block1_act", "block2_act"}
    assert all(quant.param_lr_scale == 0.5 for quant in found.values()
               if isinstance(quant, n2uq.N2UQActivationQuantizer))
    others = [quant for (name, role), quant in found.items()
              if role == "output" and name not in activations]
    assert others and all(isinstance(o, lsq.LSQQuantizer) and o.bits == 8 for o in others)
    rows = {r["layer"].replace("quant_", ""): r for r in tfq.costs.summary(q)}
    assert rows["block2_conv"]["weight_bits"] == 2 and rows["block2_conv"]["activation_bits"] == 2
    assert rows["block1_conv"]["weight_bits"] == 8


@pytest.mark.parametrize("low, high", [(0.0, 0.02), (-0.28, 6.0)])
def test_default_init_thresholds_lie_inside_the_calibration_range(low, high):
    # issue 9 (EfficientNetB0, weights=None: post-swish activations ~0.07 wide) and issue 4
    # (mobile_swish: swish outputs up to ~6): the paper's thresholds on [0, 2] sent every value of
    # the first case to one level (a constant network that the TFLite converter rejects)
    bits = 2
    x = np.random.default_rng(5).uniform(low, high, (8, 256)).astype(np.float32)
    init = schemes.N2UQQuantizers().activation_quantizer(bits, "activation").init
    assert init == "data"
    levels, mse = {}, {}
    for init in ("data", "paper"):
        q = n2uq.N2UQActivationQuantizer(bits, init=init)
        _, w = build(q, (None, 256))
        q(tf.constant(x), training=True, weights=w)
        y = q(tf.constant(x), training=False, weights=w).numpy()
        levels[init], mse[init] = np.unique(y).size, np.mean((y - x) ** 2)
        p = q.parameters(w)
        if init == "data":
            thresholds = p["thresholds"] / p["beta1"]              # T_k in units of x
            assert np.all(thresholds > low) and np.all(thresholds < high)
            assert np.unique(q.integer_grid(w).code_table()).size == 2 ** bits
    assert levels["data"] == 2 ** bits
    assert levels["paper"] == (1 if high < 1 / 3 else 2 ** bits)
    # the output the next layer (and its BatchNorm statistics) sees stays close to the input
    fit = lsq.activation_quantizer(bits, config=4, init="lsq+")._init_activation(tf.constant(x))
    s, z = float(fit["scale"]), np.round(-float(fit["offset"]) / float(fit["scale"]))
    lsq_plus_mse = np.mean(((np.clip(np.round(x / s) + z, 0, 2 ** bits - 1) - z) * s - x) ** 2)
    assert mse["data"] < 1.1 * lsq_plus_mse and mse["paper"] > 5 * mse["data"], mse


def test_scheme_default_on_tiny_activations_keeps_every_table_non_constant():
    # the smallest model with the EfficientNetB0 failure: activations far below the paper's first
    # threshold 1/3 (no BatchNorm renormalises them); one training step, then the grids
    keras.utils.set_random_seed(6)
    inputs = keras.Input((8, 8, 1))
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c1")(inputs)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c2")(h)
    h = keras.layers.Conv2D(4, 3, activation="relu", name="c3")(h)
    outputs = keras.layers.Dense(10, name="head")(keras.layers.GlobalAveragePooling2D()(h))
    net = keras.Model(inputs, outputs)
    x = 0.01 * np.random.default_rng(6).random((8, 8, 8, 1), np.float32)
    q = tfq.quantize_model(net, method="n2uq", weight_bits=2, activation_bits=2)  # default init
    q.compile(optimizer=keras.optimizers.SGD(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, np.arange(8) % 10, batch_size=8, epochs=1, verbose=0)
    tables = [quant.integer_grid(q.get_layer("quant_" + name)._output_quantizer_vars).code_table()
              for (name, role), quant in quantizer_map(q).items()
              if isinstance(quant, n2uq.N2UQActivationQuantizer)]
    assert len(tables) == 2
    assert [np.unique(t).size for t in tables] == [4, 4]  # init="paper": [1, 1]


@pytest.mark.slow
def test_efficientnet_b0_cut_trains_and_exports():
    # issue 9's large-model cell at 32x32, cut after block 1: with init="paper" every N2UQ table
    # was constant and the TFLite converter failed ("Model input is not dequantized")
    net = keras.applications.EfficientNetB0(weights=None, input_shape=(32, 32, 3), classes=10)
    pooled = keras.layers.GlobalAveragePooling2D()(net.get_layer("block1a_project_bn").output)
    model = keras.Model(net.input, keras.layers.Dense(10)(pooled))
    q = tfq.quantize_model(model, method="n2uq", weight_bits=2, activation_bits=2)
    q.compile(optimizer=keras.optimizers.SGD(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(8)
    q.fit(rng.random((4, 32, 32, 3), np.float32), rng.integers(0, 10, 4), epochs=1, verbose=0)
    tables = [quant.integer_grid(q.get_layer("quant_" + name)._output_quantizer_vars).code_table()
              for (name, role), quant in quantizer_map(q).items()
              if isinstance(quant, n2uq.N2UQActivationQuantizer)]
    assert len(tables) >= 4 and all(np.unique(t).size > 1 for t in tables)
    assert len(tfq.export.to_tflite(q)) > 0


def test_trains_on_random_data_without_nan():
    q = n2uq_model(seed=1)
    rng = np.random.default_rng(1)
    x = rng.random((32, 28, 28, 1), np.float32)
    y = rng.integers(0, 10, 32)
    q.compile(optimizer=keras.optimizers.Adam(1e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = q.fit(x, y, batch_size=8, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert all(np.all(np.isfinite(w.numpy())) for w in q.weights if w.dtype.is_floating)
    found = quantizer_map(q)
    for (name, role), quant in found.items():
        if isinstance(quant, n2uq.N2UQActivationQuantizer):
            layer = q.get_layer("quant_" + name)
            grid = quant.integer_grid(layer._output_quantizer_vars)
            assert grid.code_table().shape == (256,)


@pytest.mark.slow
def test_loss_decreases_on_real_fashion_mnist_subset():
    x, y = tfq.data.load_numpy("fashion_mnist", "train", limit=512)
    q = n2uq_model(seed=2)
    q.compile(optimizer=keras.optimizers.Adam(2e-3),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = q.fit(x, y, batch_size=32, epochs=4, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0]
    # the thresholds moved (trained), and stay ordered
    for (name, role), quant in quantizer_map(q).items():
        if isinstance(quant, n2uq.N2UQActivationQuantizer):
            p = quant.parameters(q.get_layer("quant_" + name)._output_quantizer_vars)
            assert np.all(np.diff(p["thresholds"]) > 0) and p["start"] != 0.0


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_save_load_round_trip(tmp_path, fmt):
    q = n2uq_model(seed=3, init="data")
    x = np.random.default_rng(3).random((8, 28, 28, 1), np.float32)
    q.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.fit(x, np.arange(8) % 10, epochs=1, verbose=0)
    path = str(tmp_path / ("m.h5" if fmt == "h5" else "m_savedmodel"))
    q.save(path)
    with tfq.quantize_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x).numpy(), q(x).numpy())
    names = [w.name for w in q.weights if w.name.split("/")[-1].split(":")[0].endswith(
        ("_start", "_lengths", "_beta1", "_beta2", "_zero_point", "_input_scale"))]
    assert len(names) == 2 * 6
    loaded_state = {w.name: w.numpy() for w in loaded.weights}
    for w in q.weights:
        if w.name in names:
            np.testing.assert_array_equal(loaded_state[w.name], w.numpy())
