"""PWLQ at the Keras level: BatchNorm folding (tfq/ptq/fold.py), the fixed weight quantizers
(tfq/quantizers/pwlq.py) and post-training quantization of whole models (tfq/ptq/pwlq.py).
Expectations are hand-computed values, the paper's formulas evaluated in NumPy, or the float
model's own outputs."""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq import costs, data, graph, models
from tfq.ptq import fold, pwlq_core
from tfq.ptq.pwlq import calibration_batches, pwlq
from tfq.quantizers import base
from tfq.quantizers.grid import PiecewiseGrid, UncalibratedError, UniformGrid
from tfq.quantizers.pwlq import (FixedUniformWeightQuantizer, PWLQWeightQuantizer, ShiftedGrid,
                                 integer_tail_ratio, piecewise_codes, piecewise_values)


def randomize_batch_norms(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 2.0, n), rng.normal(size=n), rng.normal(size=n),
                               rng.uniform(0.2, 3.0, n)])
    return model


def wrappers(q):
    """{inner layer name: (kernel variable, quantizer, quantizer variables)}"""
    out = {}
    for layer in q.layers:
        for weight, quantizer, qvars in costs.weight_quantizers(layer):
            out[costs.inner_layer(layer).name] = (weight, quantizer, qvars)
    return out


# ------------------------------------------------------------------ BatchNorm folding

def test_fold_hand_computed_dense():
    inp = keras.Input((1,))
    x = keras.layers.Dense(1, name="d")(inp)
    out = keras.layers.BatchNormalization(epsilon=1.0, name="bn")(x)
    model = keras.Model(inp, out)
    model.get_layer("d").set_weights([np.array([[2.0]]), np.array([1.0])])
    # gamma 3, beta 0.5, mean 1, var 3: a = 3 / sqrt(3 + 1) = 1.5
    model.get_layer("bn").set_weights([np.array([3.0]), np.array([0.5]), np.array([1.0]), np.array([3.0])])
    folded = fold.fold_batch_norms(model)
    assert [l.name for l in folded.layers] == [model.layers[0].name, "d"]
    kernel, bias = folded.get_layer("d").get_weights()
    np.testing.assert_allclose(kernel, [[3.0]])                # 2 * 1.5
    np.testing.assert_allclose(bias, [0.5])                    # 1.5 * (1 - 1) + 0.5


@pytest.mark.parametrize("build", [models.small_cnn, models.mobile_swish])
def test_fold_reference_models_outputs_equal(build):
    model = randomize_batch_norms(build(width=8))
    n_bn = sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)
    folded = fold.fold_batch_norms(model)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in folded.layers)
    assert len(folded.layers) == len(model.layers) - n_bn
    x = np.random.default_rng(1).random((4, 28, 28, 1), np.float32)
    assert np.max(np.abs(folded(x).numpy() - model(x).numpy())) < 1e-5
    for conv, bn in fold.foldable_pairs(model):
        assert folded.get_layer(conv).use_bias and not model.get_layer(conv).use_bias


def test_fold_layer_kinds_and_what_is_not_folded():
    inp = keras.Input((8, 8, 3))
    a = keras.layers.Conv2D(4, 3, activation="relu", padding="same", name="conv_relu")(inp)
    a = keras.layers.BatchNormalization(name="bn_after_relu")(a)        # nonlinearity between
    b = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(a)
    b = keras.layers.BatchNormalization(name="bn_dw")(b)
    c = keras.layers.SeparableConv2D(8, 3, padding="same", use_bias=False, name="sep")(b)
    c = keras.layers.BatchNormalization(name="bn_sep")(c)
    d = keras.layers.Conv2D(8, 1, name="shared")(c)                    # two consumers
    e = keras.layers.BatchNormalization(name="bn_shared")(d)
    f = keras.layers.Add()([d, e])
    g = keras.layers.GlobalAveragePooling2D()(f)
    h = keras.layers.Dense(5, activation="tanh", name="dense_tanh")(g)
    h = keras.layers.Dense(6, name="dense")(h)
    out = keras.layers.BatchNormalization(name="bn_dense")(h)
    model = randomize_batch_norms(keras.Model(inp, out), seed=2)
    assert sorted(fold.foldable_pairs(model)) == [("dense", "bn_dense"), ("dw", "bn_dw"), ("sep", "bn_sep")]
    folded = fold.fold_batch_norms(model)
    names = {l.name for l in folded.layers}
    assert {"bn_after_relu", "bn_shared"} <= names and not {"bn_dw", "bn_sep", "bn_dense"} & names
    assert folded.get_layer("conv_relu").activation is keras.activations.relu
    assert folded.get_layer("dense_tanh").activation is keras.activations.tanh
    x = np.random.default_rng(3).random((2, 8, 8, 3), np.float32)
    assert np.max(np.abs(folded(x).numpy() - model(x).numpy())) < 1e-5
    with_biases = fold.fold_batch_norms(model, add_missing_biases=True)
    assert all(l.use_bias for l in with_biases.layers if type(l).__name__ in fold.FOLDABLE)
    assert np.max(np.abs(with_biases(x).numpy() - model(x).numpy())) < 1e-5


# ------------------------------------------------------------------ fixed quantizers

def built(quantizer, shape, name="k"):
    layer = keras.layers.Layer()
    return quantizer.build(tf.TensorShape(shape), name, layer)


def test_piecewise_forward_hand_computed_and_straight_through():
    # 2 bits per piece (L = 3), p = 0.6, s_c = 0.2, m = 1.8, s_t = 0.4
    q = PWLQWeightQuantizer(bits=2)
    weights = built(q, (8,))
    q.assign(weights, breakpoint=np.float64(0.6), centre_scale=np.float64(0.2), tail_scale=np.float64(0.4))
    w = tf.constant([0.05, -0.25, 0.6, 0.7, -0.95, 1.8, 2.5, 0.0])
    with tf.GradientTape() as tape:
        tape.watch(w)
        out = q(w, training=False, weights=weights)
        loss = tf.reduce_sum(out * tf.range(8, dtype=tf.float32))
    np.testing.assert_allclose(out.numpy(), [0.0, -0.2, 0.6, 0.6, -1.0, 1.8, 1.8, 0.0], atol=1e-6)
    np.testing.assert_array_equal(tape.gradient(loss, w).numpy(), np.arange(8))
    grid = q.integer_grid(weights)
    assert isinstance(grid, PiecewiseGrid) and grid.bits_per_piece == 2
    sign, codes, tail = piecewise_codes(grid, [0.05, -0.25, 0.6, 0.7, -0.95, 1.8, 2.5, 0.0])
    np.testing.assert_array_equal(codes, [0, 1, 3, 0, 1, 3, 3, 0])
    np.testing.assert_array_equal(tail, [0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_allclose(piecewise_values(grid, sign, codes, tail), out.numpy(), atol=1e-6)


def test_piecewise_forward_equals_core_per_channel():
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 8, 6)).astype(np.float32)
    expected, res = pwlq_core.quantize_channels(kernel, (3,), 3, bias_correction=False)
    q = PWLQWeightQuantizer(bits=3, per_axis=3)
    weights = built(q, kernel.shape)
    q.assign(weights, breakpoint=res.grid.breakpoint, centre_scale=res.grid.centre_scale,
             tail_scale=res.grid.tail_scale)
    out = q(tf.constant(kernel), training=True, weights=weights).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    # idempotent on its own output, and the grid reproduces it from its codes
    again = q(tf.constant(out), training=False, weights=weights).numpy()
    np.testing.assert_allclose(again, out, rtol=1e-6, atol=1e-7)
    grid = q.integer_grid(weights)
    np.testing.assert_allclose(piecewise_values(grid, *piecewise_codes(grid, out)), out, rtol=1e-6, atol=1e-7)


def test_uniform_forward_hand_computed_and_grid():
    q = FixedUniformWeightQuantizer(bits=3, per_axis=1)        # codes -3..3
    weights = built(q, (4, 2))
    q.assign(weights, scale=np.array([0.5, 0.1]))
    w = np.array([[0.2, 0.04], [-0.8, 0.26], [1.0, -0.5], [0.3, 0.0]], np.float32)
    out = q(tf.constant(w), training=False, weights=weights).numpy()
    np.testing.assert_allclose(out, [[0.0, 0.0], [-1.0, 0.3], [1.0, -0.3], [0.5, 0.0]], atol=1e-6)
    grid = q.integer_grid(weights)
    assert isinstance(grid, UniformGrid) and (grid.qmin, grid.qmax) == (-3, 3) and grid.axis == (1,)
    np.testing.assert_allclose(grid.dequantize(grid.quantize(w)), out, atol=1e-6)


def test_shift_and_grids_and_bits():
    q = PWLQWeightQuantizer(bits=4, bits_mean="comp", per_axis=1, shift_axis=1)
    assert q.bits_per_piece == 3 and float(q.effective_bits(None)) == 5.0   # 3 + sign + region
    weights = built(q, (5, 2))
    with pytest.raises(UncalibratedError):
        q.integer_grid(weights)
    q.assign(weights, breakpoint=np.array([0.7, 0.7]), centre_scale=np.array([0.1, 0.1]),
             tail_scale=np.array([0.2, 0.2]), shift=np.array([0.01, -0.02]))
    w = np.zeros((5, 2), np.float32)
    np.testing.assert_allclose(q(tf.constant(w), training=False, weights=weights).numpy(),
                               np.tile([0.01, -0.02], (5, 1)), atol=1e-7)
    grid = q.integer_grid(weights)
    assert isinstance(grid, ShiftedGrid) and isinstance(grid.grid, PiecewiseGrid) and grid.axis == (1,)
    assert integer_tail_ratio(grid.grid).tolist() == [2, 2]                 # p = 7 s_c, s_t = 2 s_c
    assert float(FixedUniformWeightQuantizer(bits=6).effective_bits(None)) == 6.0
    assert float(PWLQWeightQuantizer(bits=4, bits_mean="stor").effective_bits(None)) == 4.0


def test_quantizer_config_round_trip_and_errors():
    q = PWLQWeightQuantizer(bits=5, bits_mean="stor", per_axis=(2, 3), shift_axis=3)
    clone = base.get(keras.utils.serialize_keras_object(q))
    assert clone == q and clone.bits_per_piece == 3
    assert isinstance(base.get("pwlq", bits=3), PWLQWeightQuantizer)
    assert isinstance(base.get("pwlq_uniform", bits=3), FixedUniformWeightQuantizer)
    with pytest.raises(ValueError, match="weight_bits"):
        PWLQWeightQuantizer(bits=9)
    with pytest.raises(ValueError, match="bits_mean"):
        PWLQWeightQuantizer(bits=4, bits_mean="store")
    with pytest.raises(ValueError, match="shift_axis"):
        FixedUniformWeightQuantizer(bits=4, shift_axis=1)
    q = FixedUniformWeightQuantizer(bits=4, per_axis=1)
    weights = built(q, (3, 2))
    with pytest.raises(ValueError, match="exactly"):
        q.assign(weights, scale=np.ones(2), shift=np.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        q.assign(weights, scale=np.ones(3))
    with pytest.raises(ValueError, match="> 0"):
        q.assign(weights, scale=np.array([1.0, 0.0]))


# ------------------------------------------------------------------ post-training quantization

@pytest.fixture(scope="module")
def trained_cnn():
    """small_cnn (width 8) after one epoch on 2000 Fashion-MNIST images, BatchNorm moving
    statistics then set to those of 1000 training images (momentum 0 for one training call)."""
    x, y = data.load_numpy("fashion_mnist", "train", limit=2000)
    keras.utils.set_random_seed(0)
    model = models.small_cnn(width=8)
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x, y, epochs=1, batch_size=64, verbose=0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    model(x[:1000], training=True)
    return model, x[:256], data.load_numpy("fashion_mnist", "test", limit=500)[0]


@pytest.fixture(scope="module")
def cnn_w4(trained_cnn):
    model, cal, _ = trained_cnn
    return pwlq(model, cal, weight_bits=4, batch_size=64)


def test_structure_first_last_uniform_and_costs(cnn_w4):
    ws = wrappers(cnn_w4)
    assert sorted(ws) == ["block1_conv", "block2_conv", "block3_conv", "logits"]
    for name, (_, quantizer, _) in ws.items():
        if name in ("block1_conv", "logits"):
            assert isinstance(quantizer, FixedUniformWeightQuantizer) and quantizer.bits == 8
        else:
            assert isinstance(quantizer, PWLQWeightQuantizer) and quantizer.bits_per_piece == 4
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in cnn_w4.layers)
    params = {name: int(np.prod(w.shape)) for name, (w, _, _) in ws.items()}
    expected = 8 * (params["block1_conv"] + params["logits"]) + 6 * (params["block2_conv"] + params["block3_conv"])
    assert float(costs.weight_memory(cnn_w4)) == expected


def test_kernels_lie_on_their_grids(cnn_w4):
    for name, (kernel, quantizer, qvars) in wrappers(cnn_w4).items():
        k = kernel.numpy()
        out = quantizer(tf.constant(k), training=False, weights=qvars).numpy()
        np.testing.assert_allclose(out, k, rtol=1e-6, atol=1e-7, err_msg=name)
        grid = quantizer.integer_grid(qvars)
        if isinstance(grid, PiecewiseGrid):
            back = piecewise_values(grid, *piecewise_codes(grid, k))
        else:
            back = grid.dequantize(grid.quantize(k))
        np.testing.assert_allclose(back, k, rtol=1e-6, atol=1e-7, err_msg=name)


def test_biases_are_snapped_onto_the_exported_int32_grid(trained_cnn, cnn_w4):
    """pwlq's last step (snap_for_export=True) leaves nothing for tfq.export.snap_biases to move; without
    it the biases are off the grid TFLite adds them on. At W8A8 the snapped small CNN's TFLite
    (XNNPACK) outputs equal Keras's exactly; unsnapped, some differ by a step."""
    from tfq.export import tflite, verify
    model, cal, x_test = trained_cnn
    rows = tflite.snap_biases(cnn_w4)
    assert len(rows) == 4 and not any(r["changed"] for r in rows)
    parity = {}
    for snap in (False, True):
        q = pwlq(model, cal, weight_bits=8, activation_bits=8, method="uniform", bias_correction=False,
                 batch_size=64, snap_for_export=snap)
        parity[snap] = verify.verify(q, tflite.to_tflite(q), x_test[:200])["xnnpack"]
        assert any(r["changed"] for r in tflite.snap_biases(q)) is not snap
    assert parity[True]["exact_share"] == 1.0 and parity[True]["max_step_difference"] < 1e-3, parity
    assert parity[False]["exact_share"] < 0.99, parity


def test_activation_bounds_are_calibration_bounds_of_float_tensors(trained_cnn, cnn_w4):
    model, cal, _ = trained_cnn
    folded = fold.fold_batch_norms(graph.canonicalize(model)[0])
    batches = [cal[i:i + 64] for i in range(0, len(cal), 64)]
    layers = {l.name: l for l in cnn_w4.layers}
    checks = {"quant_block1_act": "block1_act", "quant_block2_act": "block2_act", "quant_logits": "logits",
              "quant_gap": "gap"}
    input_q = next(l for l in cnn_w4.layers if type(l).__name__ == "QuantizeLayer")
    probe = keras.Model(folded.inputs, [folded.get_layer(s).output for s in checks.values()])
    recorded = [[np.asarray(t) for t in probe(b)] for b in batches]
    for i, (qname, source) in enumerate(list(checks.items()) + [(input_q.name, None)]):
        tensors = batches if source is None else [r[i] for r in recorded]
        low, high = pwlq_core.calibration_bounds(tensors)
        low, high = min(low, 0.0), max(high, 0.0)
        scale = (high - low) / 255.0
        offset = -np.round(-low / scale) * scale
        quantizer, qvars = costs.output_quantizer(layers[qname])
        np.testing.assert_allclose(quantizer.scale_numpy(qvars), scale, rtol=1e-6, err_msg=qname)
        np.testing.assert_allclose(qvars["offset"].numpy(), offset, rtol=1e-6, atol=1e-9, err_msg=qname)
        assert bool(qvars["initialized"].numpy())


def test_4bit_pwlq_closer_to_float_than_4bit_uniform(trained_cnn, cnn_w4):
    model, cal, x_test = trained_cnn
    ref = model.predict(x_test, verbose=0)

    def mse(q):
        return float(np.mean((q.predict(x_test, verbose=0) - ref) ** 2))

    uniform = pwlq(model, cal, weight_bits=4, method="uniform", batch_size=64)
    assert mse(cnn_w4) < 0.8 * mse(uniform)
    w8 = pwlq(model, cal, weight_bits=8, batch_size=64)
    assert mse(w8) < 0.02 * np.var(ref)


@pytest.mark.parametrize("fmt", ["h5", pytest.param("savedmodel", marks=pytest.mark.slow)])
def test_save_load_round_trip(tmp_path, trained_cnn, cnn_w4, fmt):
    x = trained_cnn[2][:16]
    path = str(tmp_path / ("m.h5" if fmt == "h5" else "m_savedmodel"))
    cnn_w4.save(path)
    with tfq.quantize_scope():
        loaded = keras.models.load_model(path, compile=False)
    np.testing.assert_array_equal(loaded(x).numpy(), cnn_w4(x).numpy())


def test_mobile_swish_group_search_integer_tail_ratio_runs():
    model = randomize_batch_norms(models.mobile_swish(width=8))
    x = np.random.default_rng(0).random((12, 28, 28, 1), np.float32)
    q = tfq.ptq.pwlq(model, [x[:6], (x[6:], None)], weight_bits=3, breakpoint="search", granularity="group",
                     integer_tail_ratio=True, first_last_bits=None)
    out = q.predict(x, verbose=0)
    assert out.shape == (12, 10) and np.all(np.isfinite(out))
    ws = wrappers(q)
    assert all(isinstance(quantizer, PWLQWeightQuantizer) for _, quantizer, _ in ws.values())
    assert ws["block1_pw"][1].per_axis == (2, 3)                      # 1x1 conv: input-channel groups
    for name, (kernel, quantizer, qvars) in ws.items():
        grid = quantizer.integer_grid(qvars)
        k = integer_tail_ratio(grid)
        assert k is not None, name
        multiples = kernel.numpy() / np.reshape(grid.centre_scale, [kernel.shape[a] if a in quantizer.per_axis
                                                                    else 1 for a in range(kernel.shape.rank)])
        np.testing.assert_allclose(multiples, np.round(multiples), atol=1e-3, err_msg=name)
        assert np.max(np.abs(np.round(multiples))) <= 127


def dense_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input((16,))
    x = keras.layers.Dense(8, name="hidden")(inp)
    x = keras.layers.ReLU(name="relu")(x)
    out = keras.layers.Dense(3, name="out")(x)
    return keras.Model(inp, out)


def test_bias_correction_modes_hand_checked():
    model = dense_model()
    x = np.random.default_rng(1).random((40, 16), np.float32) + 0.5
    w = model.get_layer("hidden").kernel.numpy().astype(np.float64)
    b = model.get_layer("hidden").bias.numpy()
    w_q, _ = pwlq_core.quantize_channels(w, (1,), 3, bias_correction=False)
    alpha = np.std(w, axis=0, ddof=1) / np.std(w_q, axis=0, ddof=1)
    d = w.mean(axis=0) - alpha * w_q.mean(axis=0)
    common = dict(weight_bits=3, first_last_bits=None, batch_size=16, snap_for_export=False)

    q = pwlq(model, x, bias_correction=True, **common)                 # std in grid, mean in bias
    kernel, _, _ = wrappers(q)["hidden"]
    np.testing.assert_allclose(kernel.numpy(), alpha * w_q, rtol=1e-5, atol=1e-6)
    inner = next(costs.inner_layer(l) for l in q.layers if costs.inner_layer(l).name == "hidden")
    np.testing.assert_allclose(inner.bias.numpy(), b + d * x.sum(axis=1).mean(), rtol=1e-5, atol=1e-6)

    q = pwlq(model, x, bias_correction="exact", **common)              # mean as a weight shift
    kernel, quantizer, qvars = wrappers(q)["hidden"]
    out = quantizer(kernel, training=False, weights=qvars).numpy()
    np.testing.assert_allclose(out, alpha * w_q + d, rtol=1e-5, atol=1e-6)
    assert isinstance(quantizer.integer_grid(qvars), ShiftedGrid)

    q = pwlq(model, x, bias_correction=False, **common)
    kernel, quantizer, qvars = wrappers(q)["hidden"]
    np.testing.assert_allclose(kernel.numpy(), w_q, rtol=1e-5, atol=1e-6)


def test_uniform_method_quantizers():
    model = dense_model()
    x = np.random.default_rng(2).random((8, 16), np.float32)
    q = pwlq(model, x, weight_bits=5, method="uniform", bias_correction=False, first_last_bits=None)
    for name, (kernel, quantizer, qvars) in wrappers(q).items():
        assert isinstance(quantizer, FixedUniformWeightQuantizer) and quantizer.bits == 5
        expected, _ = pwlq_core.uniform_quantize(model.get_layer(name).kernel.numpy(), 5, axis=1)
        np.testing.assert_allclose(kernel.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_calibration_data_forms_and_errors():
    x = np.ones((10, 3), np.float32)
    assert [b.shape[0] for b in calibration_batches(x, batch_size=4)] == [4, 4, 2]
    ds = tf.data.Dataset.from_tensor_slices((x, np.zeros(10))).batch(5)
    assert [b.shape for b in calibration_batches(ds)] == [(5, 3), (5, 3)]
    assert len(calibration_batches(iter([x, x]))) == 2
    with pytest.raises(ValueError, match="empty"):
        calibration_batches(np.zeros((0, 3)))
    with pytest.raises(ValueError, match="empty"):
        calibration_batches([])
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="batch 1 contains NaN"):
        calibration_batches([x, bad])
    with pytest.raises(ValueError, match="batch_size"):
        calibration_batches(x, batch_size=0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(breakpoint="median"), "breakpoint"),
    (dict(weight_bits=9), "weight_bits"),
    (dict(bias_correction="yes"), "bias_correction"),
    (dict(granularity="layer"), "granularity"),
    (dict(method="uniform", breakpoint="search"), "method='pwlq' only"),
    (dict(group_size=16), "granularity='group'"),
    (dict(first_last_bits=1), "first_last_bits"),
    (dict(activation_bits=12), "activation_bits"),
    (dict(bits_mean="stor", weight_bits=2), "weight_bits >= 3"),
    (dict(snap_for_export="yes"), "snap_for_export"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pwlq(dense_model(), np.ones((4, 16), np.float32), **kwargs)


def test_non_finite_weights_and_empty_data_are_rejected():
    model = dense_model()
    with pytest.raises(ValueError, match="calibration_data is empty"):
        pwlq(model, np.zeros((0, 16), np.float32))
    kernel = model.get_layer("out").kernel
    kernel.assign(tf.tensor_scatter_nd_update(kernel, [[0, 0]], [np.inf]))
    with pytest.raises(ValueError, match="NaN or Inf values: out/kernel"):
        pwlq(model, np.ones((4, 16), np.float32))
