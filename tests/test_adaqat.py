"""AdaQAT: DoReFa/PACT quantizers at ceil(N) bits, SAT gradients, the bit-width callback (eq. 3-4,
oscillation freezing, side-effect-free probes), state persistence, scheme placement."""
import math
import os

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq import configs, costs
from tfq.api import QuantizeWrapperV2 as QuantizeWrapper
from tfq.callbacks.adaqat import AdaQAT
from tfq.quantizers import adaqat as aq
from tfq.quantizers.grid import UncalibratedError, UniformGrid


# --- independent NumPy references (adaqat.txt sec. III-A, SAT) --------------------------------
def np_dorefa(w, bits, fan_out):
    t = np.tanh(w.astype(np.float64))
    u = t / (2 * np.abs(t).max()) + 0.5
    n = 2 ** bits - 1
    wq = 2 * np.round(u * n) / n - 1
    r = 1 / math.sqrt(fan_out) / wq.std(ddof=1)
    return wq * r, r


def np_pact(x, alpha, bits):
    n = 2 ** bits - 1
    return alpha * np.round(np.clip(x, 0, alpha) / alpha * n) / n


class _Holder(keras.layers.Layer):
    """Owns a kernel variable and the quantizer variables, as a QuantizeWrapper does."""

    def __init__(self, kernel):
        super().__init__()
        self.kernel = self.add_weight("kernel", shape=kernel.shape,
                                      initializer=keras.initializers.Constant(kernel))


def _weight_quantizer(kernel, bits):
    holder = _Holder(kernel)
    q = aq.DoReFaWeightQuantizer(init_bits=bits)
    weights = q.build(tf.TensorShape(kernel.shape), "kernel", holder)
    return q, holder, weights


def _pact(bits, alpha):
    holder = keras.layers.Layer()
    q = aq.PACTQuantizer(init_bits=bits, alpha_init=alpha)
    return q, q.build(tf.TensorShape([None, 8]), "output", holder)


KERNEL = np.random.default_rng(0).normal(0, 0.6, (3, 3, 2, 4)).astype(np.float32)


# --- quantizers ------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_dorefa_forward_matches_the_paper_and_its_grid(bits):
    q, _, weights = _weight_quantizer(KERNEL, bits)
    out = q(weights["kernel"], True, weights).numpy()
    expected, r = np_dorefa(KERNEL, bits, fan_out=3 * 3 * 4)   # Conv2D HWIO: H*W*O
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    assert len(np.unique(np.round(out, 5))) <= 2 ** bits
    grid = q.integer_grid(weights)
    n = 2 ** bits - 1
    assert (grid.bits, grid.qmin, grid.qmax, grid.axis) == (bits + 1, -n, n, None)
    assert int(grid.zero_point) == 0 and float(grid.scale) == pytest.approx(r / n, rel=1e-5)
    codes = grid.quantize(out)
    assert np.all(codes % 2 != 0)                          # odd integers: 2 round(u n) - n
    np.testing.assert_array_equal(codes, q.integer_codes(weights))
    np.testing.assert_allclose(grid.dequantize(codes), out, rtol=1e-5, atol=1e-7)


def test_dorefa_gradient_is_the_straight_through_derivative_of_the_tanh_map():
    q, _, weights = _weight_quantizer(KERNEL, 3)
    upstream = np.random.default_rng(1).normal(size=KERNEL.shape)
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(q(weights["kernel"], True, weights) * upstream)
    grad = tape.gradient(loss, weights["kernel"]).numpy()
    _, r = np_dorefa(KERNEL, 3, 36)

    def smooth(w):  # rounding replaced by identity, r held constant
        t = np.tanh(w)
        return np.sum(upstream * r * (2 * (t / (2 * np.abs(t).max()) + 0.5) - 1))

    w64, eps = KERNEL.astype(np.float64), 1e-6
    numeric = np.zeros_like(w64)
    for i in np.ndindex(w64.shape):
        hi, lo = w64.copy(), w64.copy()
        hi[i] += eps
        lo[i] -= eps
        numeric[i] = (smooth(hi) - smooth(lo)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("rescale", ["stddev", "none"])
def test_dorefa_other_rescalings(rescale):
    holder = _Holder(KERNEL)
    q = aq.DoReFaWeightQuantizer(init_bits=4, rescale=rescale)
    weights = q.build(tf.TensorShape(KERNEL.shape), "kernel", holder)
    out = q(weights["kernel"], True, weights).numpy()
    unit, r_constant = np_dorefa(KERNEL, 4, fan_out=36)
    wq = unit / r_constant                                   # 2 q(u) - 1, in [-1, 1]
    r = KERNEL.std(ddof=1) / wq.std(ddof=1) if rescale == "stddev" else 1.0
    np.testing.assert_allclose(out, wq * r, rtol=1e-5, atol=1e-6)
    assert float(q.integer_grid(weights).scale) == pytest.approx(r / 15, rel=1e-5)
    if rescale == "stddev":   # the float layer's weight scale is kept
        assert out.std(ddof=1) == pytest.approx(KERNEL.std(ddof=1), rel=1e-5)


def test_fan_out_rules():
    assert aq.fan_out_of("Conv2D", (3, 3, 8, 16)) == 3 * 3 * 16
    assert aq.fan_out_of("DepthwiseConv2D", (3, 3, 8, 2)) == 3 * 3 * 8 * 2
    assert aq.fan_out_of("Dense", (10, 4)) == 4
    with pytest.raises(ValueError, match="Conv3D"):
        aq.fan_out_of("Conv3D", (1, 1, 1, 1, 1))


def test_pact_forward_and_sat_gradients():
    alpha, bits = 2.0, 2
    q, weights = _pact(bits, alpha)
    x = tf.constant([[-1.0, 0.0, 0.3, 0.9, 1.4, 1.99, 2.0, 3.5]])
    upstream = tf.constant([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x, True, weights)
        loss = tf.reduce_sum(y * upstream)
    dx, dalpha = tape.gradient(loss, [x, weights["alpha"]])
    xs, up, n = x.numpy()[0], upstream.numpy()[0], 3
    np.testing.assert_allclose(y.numpy()[0], np_pact(xs, alpha, bits), atol=1e-6)
    # SAT: dy/dx = 1 on [0, alpha); dy/dalpha = q(x/alpha) - x/alpha there, 1 from alpha up, 0 below 0
    expected_dx = [0, 2, 3, 4, 5, 6, 0, 0]
    expected_dalpha = sum(u * (np.round(v / alpha * n) / n - v / alpha) for v, u in zip(xs, up) if 0 <= v < alpha)
    expected_dalpha += 7 + 8
    np.testing.assert_allclose(dx.numpy()[0], expected_dx, atol=1e-6)
    assert float(dalpha) == pytest.approx(expected_dalpha, rel=1e-5)
    grid = q.integer_grid(weights)
    assert grid == UniformGrid(scale=alpha / n, zero_point=0, bits=2, qmin=0, qmax=3)
    np.testing.assert_allclose(grid.dequantize(grid.quantize(y.numpy())), y.numpy(), atol=1e-6)


def test_signed_pact_for_tensors_that_can_be_negative():
    alpha, bits = 1.5, 3                      # h = 2^(3-1) - 1 = 3 positive codes
    holder = keras.layers.Layer()
    q = aq.PACTQuantizer(init_bits=bits, alpha_init=alpha, signed=True)
    weights = q.build(tf.TensorShape([None, 6]), "output", holder)
    x = tf.constant([[-2.0, -0.9, -0.2, 0.4, 1.1, 1.7]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x, True, weights)
        loss = tf.reduce_sum(y)
    dx, dalpha = tape.gradient(loss, [x, weights["alpha"]])
    xs, h = x.numpy()[0], 3
    expected = alpha * np.round(np.clip(xs, -alpha, alpha) / alpha * h) / h
    np.testing.assert_allclose(y.numpy()[0], expected, atol=1e-6)
    np.testing.assert_allclose(dx.numpy()[0], [0, 1, 1, 1, 1, 0])
    inside = sum(np.round(v / alpha * h) / h - v / alpha for v in xs[1:5])
    assert float(dalpha) == pytest.approx(inside - 1 + 1, rel=1e-5)     # -1 below -alpha, +1 above
    grid = q.integer_grid(weights)
    assert (grid.qmin, grid.qmax, grid.bits) == (-3, 3, 3) and float(grid.scale) == pytest.approx(alpha / 3)
    np.testing.assert_allclose(grid.dequantize(grid.quantize(y.numpy())), y.numpy(), atol=1e-6)


def test_asymmetric_pact_calibrates_its_share_below_zero_and_follows_sat():
    """First batch: max x = 3.0, min x = -0.6 -> r = 0.6/3.6 = 1/6; at 4 bits n = 15, z = round(2.5)
    = 2 codes below zero (half to even), p = 13 above, step 3/13; alpha stays SAT's constant 3.0."""
    alpha, bits = 3.0, 4
    holder = keras.layers.Layer()
    q = aq.PACTQuantizer(init_bits=bits, alpha_init=alpha, signed=True, asymmetric=True)
    weights = q.build(tf.TensorShape([None, 7]), "output", holder)
    assert not q.is_initialized(weights)          # the share needs data, even with a numeric alpha
    with pytest.raises(UncalibratedError, match="output"):
        q.integer_grid(weights)
    x = tf.constant([[-0.6, -0.5, -0.1, 0.0, 0.4, 2.9, 3.0]])
    q(x, True, weights)
    assert float(weights["negative_share"]) == pytest.approx(1 / 6) and float(weights["alpha"]) == alpha
    x = tf.constant([[-1.0, -0.45, -0.1, 0.0, 0.4, 2.9, 3.5]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = q(x, True, weights)
        loss = tf.reduce_sum(y)
    dx, dalpha = tape.gradient(loss, [x, weights["alpha"]])
    step, z, p = alpha / 13, 2, 13
    xs = x.numpy()[0]
    codes = np.round(np.clip(xs, -z * step, alpha) / step)
    np.testing.assert_allclose(y.numpy()[0], codes * step, atol=1e-6)
    assert codes.min() == -2 and codes.max() == 13
    np.testing.assert_allclose(dx.numpy()[0], [0, 1, 1, 1, 1, 1, 0])   # inside [-z step, alpha)
    inside = sum(c / p - v / alpha for c, v in zip(codes[1:6], xs[1:6]))
    assert float(dalpha) == pytest.approx(inside - z / p + 1.0, rel=1e-5)  # -z/p below, 1 above
    grid = q.integer_grid(weights)
    assert (grid.qmin, grid.qmax, grid.bits, int(grid.zero_point)) == (-2, 13, 4, 0)
    assert float(grid.scale) == pytest.approx(step)
    np.testing.assert_array_equal(grid.quantize(y.numpy()[0].astype(np.float64)), codes)
    weights["activation_bits"].assign(2.0)         # 2 bits: n = 3, z = round(0.5) = 0 -> unsigned grid
    grid = q.integer_grid(weights)
    assert (grid.qmin, grid.qmax) == (0, 3)
    np.testing.assert_allclose(q(x, False, weights).numpy()[0], np_pact(xs, alpha, 2), atol=1e-6)
    assert aq.PACTQuantizer.from_config(q.get_config()) == q
    assert aq.PACTQuantizer.from_config(q.get_config()) != aq.PACTQuantizer(bits, alpha, signed=True)
    with pytest.raises(ValueError, match="asymmetric=True is for signed PACT"):
        aq.PACTQuantizer(bits, alpha, asymmetric=True)
    with pytest.raises(ValueError, match="signed_activations must be one of"):
        tfq.schemes.AdaQATScheme(4, 4, signed_activations="skewed")


def test_asymmetric_pact_with_alpha_max_takes_the_largest_positive_value():
    holder = keras.layers.Layer()
    q = aq.PACTQuantizer(init_bits=8, alpha_init="max", signed=True, asymmetric=True)
    weights = q.build(tf.TensorShape([None, 4]), "output", holder)
    q(tf.constant([[-0.25, 0.0, 1.0, 4.75]]), True, weights)
    assert float(weights["alpha"]) == pytest.approx(4.75)
    assert float(weights["negative_share"]) == pytest.approx(0.05)
    grid = q.integer_grid(weights)
    assert (grid.qmin, grid.qmax) == (-13, 242)   # z = round(0.05 * 255) = 13


@pytest.mark.parametrize("signed_activations", ["asymmetric", "symmetric"])
def test_swish_model_exports_its_signed_pact_grids_exactly(signed_activations):
    """Conv -> BN -> swish (signed PACT) -> Conv -> ReLU (unsigned PACT) -> pool -> Dense at W4/A4,
    calibrated and snapped as ``tfq train`` does: the int8 graph equals the IntegerGraph (reference
    kernels) bit for bit and Keras within one step."""
    from tfq.export import tflite as tfl, verify as ver
    keras.utils.set_random_seed(0)
    inputs = keras.Input((10, 10, 1))
    x = keras.layers.Conv2D(6, 3, name="c0")(inputs)
    x = keras.layers.BatchNormalization(name="bn0")(x)
    x = keras.layers.Activation("swish", name="swish")(x)
    x = keras.layers.Conv2D(6, 3, name="c1")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.Conv2D(6, 1, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="out")(x))
    q = tfq.quantize_model(model, method="adaqat", weight_bits=4, activation_bits=4, alpha_init="max",
                           signed_activations=signed_activations)
    images = np.random.default_rng(2).uniform(0, 1, (64, 10, 10, 1)).astype(np.float32)
    tfq.calibrate(q, images)
    quantizer, weights = costs.output_quantizer(q.get_layer("quant_swish"))[:2]
    assert quantizer.signed and quantizer.asymmetric == (signed_activations == "asymmetric")
    grid = quantizer.integer_grid(weights)
    if quantizer.asymmetric:                         # swish >= -0.28: few of the 15 steps below zero
        assert 0 < -grid.qmin < grid.qmax and grid.qmax - grid.qmin == 15
    else:
        assert (grid.qmin, grid.qmax) == (-7, 7)
    tfl.snap_biases(q)
    flat = tfl.to_tflite(q)
    report = ver.verify(q, flat, images)
    assert report["integer_graph_vs_reference"]["bit_exact"], report
    assert report["xnnpack"]["within_one_step"] >= 0.999, report
    assert report["xnnpack"]["argmax_agreement"] in (None, 1.0), report


@pytest.mark.parametrize("signed", [False, True])
def test_alpha_init_max_takes_the_first_training_batch_largest_magnitude(signed):
    holder = keras.layers.Layer()
    q = aq.PACTQuantizer(init_bits=3, alpha_init="max", signed=signed)
    weights = q.build(tf.TensorShape([None, 5]), "output", holder)
    assert not q.is_initialized(weights)
    with pytest.raises(UncalibratedError, match="output"):
        q.integer_grid(weights)                        # export refuses an uncalibrated alpha
    first = tf.constant([[-2.5, -0.3, 0.2, 0.9, 1.75]])
    q(first, False, weights)                           # inference never initialises activations
    assert not q.is_initialized(weights)
    y = q(first, True, weights).numpy()[0]
    alpha = 2.5 if signed else 1.75                    # max |x| on [-alpha, alpha], else max x
    assert float(weights["alpha"]) == pytest.approx(alpha) and q.is_initialized(weights)
    n = 3 if signed else 7
    lower = -alpha if signed else 0.0
    expected = alpha * np.round(np.clip(first.numpy()[0], lower, alpha) / alpha * n) / n
    np.testing.assert_allclose(y, expected, atol=1e-6)
    q(first * 4.0, True, weights)                      # later batches leave alpha to training
    assert float(weights["alpha"]) == pytest.approx(alpha)
    assert q.integer_grid(weights).scale == pytest.approx(alpha / n)
    assert aq.PACTQuantizer.from_config(q.get_config()) == q


def test_bits_are_ceil_n_at_run_time_with_a_straight_through_derivative():
    q, weights = _pact(4, 1.0)
    x = tf.constant(np.linspace(0.0, 1.0, 1001, dtype=np.float32)[None])
    for n_value, bits in ((2.3, 3), (3.0, 3), (7.01, 8), (1.5, 2)):
        weights["activation_bits"].assign(n_value)
        assert len(np.unique(q(x, True, weights).numpy())) == 2 ** bits
        assert q.current_bits(weights) == bits
        with tf.GradientTape() as tape:
            tape.watch(weights["activation_bits"])  # non-trainable: watched explicitly
            eb = q.effective_bits(weights)
        assert float(eb) == bits and float(tape.gradient(eb, weights["activation_bits"])) == 1.0


def test_eight_bit_dorefa_weights_do_not_fit_int8_and_bad_arguments_are_named():
    q, _, weights = _weight_quantizer(KERNEL, 8)
    with pytest.raises(ValueError, match="int8 container"):
        q.integer_grid(weights)
    with pytest.raises(ValueError, match="init_bits"):
        aq.DoReFaWeightQuantizer(init_bits=9)
    with pytest.raises(ValueError, match="alpha_init"):
        aq.PACTQuantizer(alpha_init=0)
    with pytest.raises(ValueError, match='alpha_init must be a number > 0 or "max"'):
        aq.PACTQuantizer(alpha_init="percentile")
    with pytest.raises(ValueError, match="rescale"):
        tfq.schemes.AdaQATScheme(4, 4, rescale="per-channel")
    assert aq.PACTQuantizer.from_config(aq.PACTQuantizer(3, 10.0).get_config()) == aq.PACTQuantizer(3, 10.0)


# --- scheme ------------------------------------------------------------------------------------
def _small_model(input_shape=(8, 8, 1), blocks=3):
    inputs = keras.Input(input_shape)
    x = inputs
    for i in range(blocks):
        x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name=f"conv{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(x))


def _quantizers(q):
    return {layer.name: ([type(qz).__name__ for _, qz, _ in costs.weight_quantizers(layer)],
                         type(costs.output_quantizer(layer)[0]).__name__) for layer in q.layers}


def test_scheme_places_dorefa_and_pact_between_8_bit_first_and_last_layers():
    keras.utils.set_random_seed(0)
    q = tfq.quantize_model(_small_model(), method="adaqat", weight_bits=5, activation_bits=4)
    placed = _quantizers(q)
    assert placed["quant_conv0"][0] == ["LSQQuantizer"] and placed["quant_logits"][0] == ["LSQQuantizer"]
    assert placed["quant_conv1"][0] == placed["quant_conv2"][0] == ["DoReFaWeightQuantizer"]
    # inputs of the middle convolutions are PACT; the input of the last layer stays 8-bit LSQ+
    assert placed["quant_relu0"][1] == placed["quant_relu1"][1] == "PACTQuantizer"
    assert placed["quant_relu2"][1] == "LSQQuantizer"
    states = aq.adaqat_states(q)
    assert len(states["weight"]) == 2 and len(states["activation"]) == 2
    assert {float(s["bits"].numpy()) for s in states["weight"]} == {5.0}
    assert {float(s["bits"].numpy()) for s in states["activation"]} == {4.0}
    rows = {r.name: r for r in costs.layer_costs(q)}
    assert [float(costs.weight_bits(rows[n])) for n in ("quant_conv0", "quant_conv1", "quant_logits")] == [8, 5, 8]
    assert float(costs.activation_bits(rows["quant_conv2"])) == 4.0
    # tensors that can be negative get the signed PACT, ReLU outputs (also through pooling) the unsigned
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="c0")(inputs)
    x = keras.layers.Activation("swish", name="swish")(x)
    x = keras.layers.Conv2D(4, 1, name="c1")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.AveragePooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(4, 1, name="c2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    q2 = tfq.quantize_model(keras.Model(inputs, keras.layers.Dense(2, name="out")(x)), method="adaqat")
    assert costs.output_quantizer(q2.get_layer("quant_swish"))[0].signed is True
    assert costs.output_quantizer(q2.get_layer("quant_pool"))[0].signed is False
    scheme = tfq.schemes.AdaQATScheme(3, 6, first_last_bits=8)
    assert scheme.quantizers.init_weight_bits == 3 and scheme.quantizers.init_activation_bits == 6
    with pytest.raises(ValueError, match="not both"):
        tfq.schemes.get("adaqat", weight_bits=4, init_weight_bits=4)
    with pytest.raises(ValueError, match="init_activation_bits"):
        tfq.schemes.AdaQATScheme(4, 1)


def test_scheme_alpha_init_max_calibrates_each_pact_from_its_own_tensor():
    keras.utils.set_random_seed(0)
    q = tfq.quantize_model(_small_model(), method="adaqat", weight_bits=5, activation_bits=4, alpha_init="max")
    assert not tfq.api.is_calibrated(q)
    x = tf.constant(np.random.default_rng(1).normal(size=(16, 8, 8, 1)), tf.float32)
    tfq.calibrate(q, x)
    assert tfq.api.is_calibrated(q)
    for name in ("quant_relu0", "quant_relu1"):
        quantizer, weights = costs.output_quantizer(q.get_layer(name))[:2]
        # the float tensor the quantizer saw: its layer's input through the calibrated model, then ReLU
        producer = keras.Model(q.input, q.get_layer(name).input)
        expected = float(tf.reduce_max(tf.nn.relu(producer(x, training=True))))
        assert float(weights["alpha"]) == pytest.approx(expected, rel=1e-5)
        assert quantizer.integer_grid(weights).scale == pytest.approx(expected / 15, rel=1e-5)
    with pytest.raises(ValueError, match="alpha_init"):
        tfq.quantize_model(_small_model(), method="adaqat", alpha_init="mean")


# --- the callback: eq. 3 on a model whose losses are computed by hand ---------------------------
W1 = np.array([[0.3, -0.8], [0.5, 0.1]], np.float32)
W2 = np.array([[0.4], [-0.7]], np.float32)
X = np.array([[1.0, 0.5], [-0.3, 0.8], [0.7, -0.2], [1.5, 1.1]], np.float32)
Y = np.array([[0.2], [-0.1], [0.4], [0.3]], np.float32)
ALPHA = 1.0


def _hand_model():
    cfg = configs.LayerQuantizeConfig
    inputs = keras.Input((2,))
    d1, d2 = keras.layers.Dense(2, use_bias=False, name="d1"), keras.layers.Dense(1, use_bias=False, name="d2")
    d2(d1(inputs))  # called once so that tfq.costs can read their output shapes (as after quantize_apply)
    h = QuantizeWrapper(d1, cfg({"kernel": aq.DoReFaWeightQuantizer(3)}, aq.PACTQuantizer(3, ALPHA)))(inputs)
    out = QuantizeWrapper(d2, cfg({"kernel": aq.DoReFaWeightQuantizer(3)}, None))(h)
    model = keras.Model(inputs, out)
    for wrapper, value in ((model.layers[1], W1), (model.layers[2], W2)):
        next(w for w in wrapper.weights if w.name.endswith("/kernel:0")).assign(value)
    model.compile(keras.optimizers.SGD(0.0), loss="mse")
    return model


def _hand_loss(kw, ka):
    w1, _ = np_dorefa(W1, kw, fan_out=2)
    w2, _ = np_dorefa(W2, kw, fan_out=1)
    y = np_pact(X @ w1, ALPHA, ka) @ w2
    return float(np.mean((y - Y) ** 2))


def test_bit_gradient_is_the_finite_difference_plus_lambda_dbitops():
    model = _hand_model()
    lam, eta_w, eta_a = 0.1, 1e-3, 5e-4
    cb = AdaQAT(lambda_=lam, lr_weight=eta_w, lr_activation=eta_a)
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0, callbacks=[cb], shuffle=False)
    # BitOPs = 4 MACs x kw x 32 (float input) + 2 MACs x kw x ka; L_hard = BitOPs / 6 adaptive MACs
    d_hard_w, d_hard_a = (4 * 32 + 2 * 3) / 6, 2 * 3 / 6
    full, less_w, less_a = _hand_loss(3, 3), _hand_loss(2, 3), _hand_loss(3, 2)
    assert abs(full - less_w) > 1e-3 and abs(full - less_a) > 1e-3   # the probes matter
    h = cb.history
    assert h["loss"][0] == pytest.approx(full, rel=1e-5)
    assert h["loss_weight_probe"][0] == pytest.approx(less_w, rel=1e-5)
    assert h["loss_activation_probe"][0] == pytest.approx(less_a, rel=1e-5)
    g_w, g_a = full - less_w + lam * d_hard_w, full - less_a + lam * d_hard_a
    assert h["weight_gradient"][0] == pytest.approx(g_w, rel=1e-5)
    assert h["activation_gradient"][0] == pytest.approx(g_a, rel=1e-5)
    assert h["weight_N"][0] == pytest.approx(3.0 - eta_w * g_w, abs=1e-6)
    assert h["activation_N"][0] == pytest.approx(3.0 - eta_a * g_a, abs=1e-6)
    assert h["bitops"][0] == 4 * 3 * 32 + 2 * 3 * 3
    # the callback removed its train step: plain fit works again and leaves N alone
    model.fit(X, Y, batch_size=4, epochs=1, verbose=0)
    assert float(aq.adaqat_states(model)["weight"][0]["bits"].numpy()) == pytest.approx(h["weight_N"][0])


class _ScriptedAdaQAT(AdaQAT):
    """Task loss scripted as a function of ceil(N_w): L(2)=1.5, L(3)=1.0, L(4)=1.5 (flat in N_a)."""

    table = tf.constant([9.0, 9.0, 1.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5])

    def task_loss(self, x, y, sample_weight):
        n = self._attached["states"]["weight"][0]["bits"]
        return tf.gather(self.table, tf.cast(aq.integer_bits(n), tf.int32))


def test_scripted_losses_freeze_weights_on_the_eleventh_upward_crossing():
    model = _hand_model()
    for s in aq.adaqat_states(model)["weight"]:
        s["bits"].assign(3.75)
    cb = _ScriptedAdaQAT(lambda_=0.0, lr_weight=1.0, lr_activation=1.0, oscillation_limit=10)
    x, y = np.repeat(X[:1], 30, 0), np.repeat(Y[:1], 30, 0)
    model.fit(x, y, batch_size=1, epochs=1, verbose=0, callbacks=[cb], shuffle=False)
    h = cb.history
    # 3.75 -> 3.25 -> 2.75 (g = L(4) - L(3) = 0.5), then up (g = L(3) - L(2) = -0.5) and down again
    assert h["weight_N"][:5] == [3.25, 2.75, 3.25, 2.75, 3.25]
    rises = [i for i in range(1, 30) if h["weight_bits"][i] > h["weight_bits"][i - 1]]
    frozen_at = h["weight_frozen"].index(True)
    # every second step rises from 3 to 4; the 11th rise (step index 22) freezes N at 4
    assert rises == list(range(2, 23, 2)) and frozen_at == rises[10] == 22
    assert all(v == 4.0 for v in h["weight_N"][frozen_at:]) and all(h["weight_frozen"][frozen_at:])
    assert all(g == 0.0 for g in h["weight_gradient"][frozen_at + 1:])
    state = aq.adaqat_states(model)["weight"]
    for s in state:
        assert s["crossings"].numpy()[3] == 11 and bool(s["frozen"].numpy())
    assert h["activation_N"][-1] == 3.0 and not h["activation_frozen"][-1]   # flat in N_a, lambda 0


def test_probes_leave_batchnorm_optimizer_and_metrics_untouched():
    keras.utils.set_random_seed(1)
    net = _small_model(blocks=2)
    x = np.random.default_rng(2).random((16, 8, 8, 1), np.float32)
    y = np.arange(16) % 3

    def run(with_callback):
        q = tfq.quantize_model(net, method="adaqat", weight_bits=4, activation_bits=4)
        q.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        cb = AdaQAT(lambda_=0.1) if with_callback else None
        hist = q.fit(x, y, batch_size=16, epochs=1, verbose=0, shuffle=False, callbacks=[cb] if cb else [])
        return q, hist.history, cb

    probed, logs, cb = run(True)
    plain, plain_logs, _ = run(False)
    assert cb.history["loss_weight_probe"][0] > 0 and cb.history["loss_activation_probe"][0] > 0
    assert int(probed.optimizer.iterations.numpy()) == int(plain.optimizer.iterations.numpy()) == 1
    assert logs["loss"] == plain_logs["loss"] and logs["accuracy"] == plain_logs["accuracy"]
    state_roles = ("weight_bits", "activation_bits", "bit_crossings", "bits_frozen")
    compared = 0
    for a, b in zip(probed.weights, plain.weights):
        assert a.name == b.name
        if any(a.name.endswith(f"_{role}:0") for role in state_roles):
            continue
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
        compared += "moving_mean" in a.name
    assert compared == 2
    moving = [w for w in probed.weights if "moving_mean" in w.name][0].numpy()
    assert np.any(moving != 0.0)   # the real step did update them (once)
    slots, plain_slots = probed.optimizer.variables(), plain.optimizer.variables()
    assert len(slots) == len(plain_slots) > 1
    for a, b in zip(slots, plain_slots):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_state_survives_checkpoint_resume_with_the_same_trajectory(tmp_path):
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(24, 2)).astype(np.float32), rng.normal(size=(24, 1)).astype(np.float32)

    def fresh():
        model = _hand_model()
        model.compile(keras.optimizers.SGD(0.05, momentum=0.9), loss="mse")
        return model

    def fit(model, xs, ys):
        cb = AdaQAT(lambda_=0.2, lr_weight=0.05, lr_activation=1.0, oscillation_limit=1)
        model.fit(xs, ys, batch_size=4, epochs=1, verbose=0, shuffle=False, callbacks=[cb])
        return cb

    whole = fresh()
    cb_whole = fit(whole, x, y)
    first = fresh()
    cb_first = fit(first, x[:12], y[:12])
    path = tf.train.Checkpoint(model=first, optimizer=first.optimizer).save(str(tmp_path / "ckpt"))
    resumed = fresh()
    tf.train.Checkpoint(model=resumed, optimizer=resumed.optimizer).restore(path)
    cb_resumed = fit(resumed, x[12:], y[12:])
    for key in ("weight_N", "activation_N"):
        np.testing.assert_allclose(cb_first.history[key] + cb_resumed.history[key], cb_whole.history[key],
                                   atol=1e-5)
    assert len(set(cb_whole.history["weight_bits"])) > 1       # the trajectory does cross bit-widths
    assert cb_resumed.history["step"][0] == 4                  # optimizer state came back too
    end, end_resumed = cb_whole.current(), cb_resumed.current()
    for kind in ("weight", "activation"):
        assert end[kind]["N"] == pytest.approx(end_resumed[kind]["N"], abs=1e-5)
        assert end[kind]["crossings"] == end_resumed[kind]["crossings"]
        assert end[kind]["frozen"] == end_resumed[kind]["frozen"]


@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_state_round_trips_through_save_and_load(tmp_path, fmt):
    keras.utils.set_random_seed(4)
    q = tfq.quantize_model(_small_model(blocks=2), method="adaqat", weight_bits=4, activation_bits=5)
    x = np.random.default_rng(6).random((8, 8, 8, 1), np.float32)
    tfq.calibrate(q, x)
    state = {"weight": {"N": 2.5, "crossings": [0, 0, 3, 1, 0, 0, 0, 0, 0], "frozen": True},
             "activation": {"N": 6.25, "crossings": [0, 0, 0, 0, 0, 2, 0, 0, 0], "frozen": False}}
    for kind, group in aq.adaqat_states(q).items():
        for s in group:   # what the callback would have written
            s["bits"].assign(state[kind]["N"])
            s["crossings"].assign(state[kind]["crossings"])
            s["frozen"].assign(state[kind]["frozen"])
    path = str(tmp_path / ("m.h5" if fmt == "h5" else "m_savedmodel"))
    q.save(path)
    with tfq.quantize_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x).numpy(), q(x).numpy())
    loaded_states = aq.adaqat_states(loaded)
    for kind in ("weight", "activation"):
        for s in loaded_states[kind]:
            assert float(s["bits"].numpy()) == state[kind]["N"]
            assert s["crossings"].numpy().tolist() == state[kind]["crossings"]
            assert bool(s["frozen"].numpy()) == state[kind]["frozen"]
    for name in ("quant_conv1", "quant_relu0"):
        a, b = q.get_layer(name), loaded.get_layer(name)
        pairs = ([(qz, v, lz, lv) for (_, qz, v), (_, lz, lv) in zip(costs.weight_quantizers(a),
                                                                      costs.weight_quantizers(b))]
                 or [(*costs.output_quantizer(a), *costs.output_quantizer(b))])
        for qz, v, lz, lv in pairs:
            assert qz.integer_grid(v) == lz.integer_grid(lv)


def test_tensorboard_and_logs(tmp_path):
    model = _hand_model()
    cb = AdaQAT(lambda_=0.1, log_dir=str(tmp_path))
    hist = model.fit(X, Y, batch_size=2, epochs=2, verbose=0, callbacks=[cb])
    assert hist.history["weight_bits"] == [3.0, 3.0] and hist.history["bitops"][-1] == 4 * 3 * 32 + 2 * 3 * 3
    assert cb.history["step"] == [1, 2, 3, 4]
    events = [f for root, _, files in os.walk(tmp_path) for f in files if "tfevents" in f]
    assert events


def test_callback_arguments_and_models_are_checked():
    with pytest.raises(ValueError, match="lambda_"):
        AdaQAT(lambda_=-1)
    with pytest.raises(ValueError, match="min_activation_bits"):
        AdaQAT(min_activation_bits=1)
    with pytest.raises(ValueError, match="oscillation_limit"):
        AdaQAT(oscillation_limit=2.5)
    with pytest.raises(ValueError, match="max_bits"):
        AdaQAT(min_weight_bits=4, max_bits=3)
    q = tfq.quantize_model(_small_model(), method="lsq+")
    with pytest.raises(ValueError, match="method='adaqat'"):
        AdaQAT().set_model(q)


def test_activations_never_drop_below_two_bits():
    model = _hand_model()
    cb = AdaQAT(lambda_=50.0, lr_weight=0.0, lr_activation=0.2)
    model.fit(np.repeat(X, 5, 0), np.repeat(Y, 5, 0), batch_size=4, epochs=1, verbose=0, callbacks=[cb])
    assert min(cb.history["activation_bits"]) == 2 and cb.history["activation_N"][-1] > 1.0


def test_later_fit_calls_reuse_the_traced_step_and_the_model_keeps_its_own():
    """Each ``fit`` attaches the callback and detaches it at the end. A second ``fit`` with the same
    callback and compile reuses the train function traced with the probes (no new trace: on
    ResNet50 a trace took ~200 s, benchmarks/large_models.py), a plain ``fit`` afterwards gets the
    model's own function back, and a new ``compile`` forces a fresh trace."""
    model = _hand_model()
    cb = AdaQAT(lambda_=0.1)
    traces = []
    probe = cb._probe

    def counted(*args):
        traces.append(1)   # Python runs here only while tracing
        return probe(*args)

    cb._probe = counted
    model.fit(X, Y, batch_size=2, epochs=1, verbose=0)           # the model's own step
    own = model.train_function
    model.fit(X, Y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    first = len(traces)
    assert first >= 1 and model.train_function is own
    model.fit(X, Y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    assert len(traces) == first and cb.history["step"] == [3, 4, 5, 6]   # after the plain fit's 2
    model.compile(keras.optimizers.SGD(0.0), loss="mse")
    model.fit(X, Y, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    assert len(traces) > first


def test_a_non_finite_loss_leaves_the_bit_widths_unchanged_and_warns():
    """A NaN task/probe loss makes eq. 3's gradient NaN; N (saved with the model) must not become NaN
    for good: the step leaves N, the crossing counts and the frozen flags as they were, and the
    callback warns once."""
    model = _hand_model()
    cb = AdaQAT(lambda_=0.1, lr_weight=0.5, lr_activation=0.5)
    states = aq.adaqat_states(model)
    start = {kind: float(group[0]["bits"].numpy()) for kind, group in states.items() if group}
    y_nan = np.full_like(Y, np.nan)
    with pytest.warns(UserWarning, match="not finite"):
        model.fit(X, y_nan, batch_size=2, epochs=1, verbose=0, callbacks=[cb])
    assert cb.history["step"] == [1, 2] and all(np.isnan(g) for g in cb.history["weight_gradient"])
    for kind, group in states.items():
        if group:
            assert float(group[0]["bits"].numpy()) == start[kind]
            assert not group[0]["frozen"].numpy() and not group[0]["crossings"].numpy().any()
