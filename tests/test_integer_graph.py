"""IntegerGraph (tfq/export/integer.py) against the LiteRT interpreter.

Every model is converted with full-integer post-training quantization and run with the reference
kernels (``OpResolverType.BUILTIN_REF``): the integer graph must match them exactly.  The default
resolver (XNNPACK) is run too and its one-step disagreements are printed (``-s``), not asserted.
"""
import json
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import numpy as np
import pytest

import tfq  # noqa: F401  (selects Keras 2 before TensorFlow loads)
import tensorflow as tf
import tf_keras as keras
from ai_edge_litert.interpreter import Interpreter, OpResolverType

from tfq.export.integer import (INT32_MAX, INT32_MIN, IntegerGraph, IntegerGraphError, TensorSpec,
                                UnsupportedOpError, multiply_by_quantized_multiplier,
                                quantize_multiplier, rounding_divide_by_pot,
                                saturating_rounding_doubling_high_mul)

L = keras.layers


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------

def _convert(model, per_tensor_dense=False, float_io=False, seed=0, ranges=None):
    """Full-integer PTQ; ``ranges[i]`` is the half-width of the uniform calibration data of input i."""
    shapes = [tuple(s[1:]) for s in (model.input_shape if isinstance(model.input_shape, list)
                                     else [model.input_shape])]
    ranges = ranges or [1.0] * len(shapes)

    def representative():
        rng = np.random.default_rng(seed)
        for _ in range(24):
            yield [rng.uniform(-r, r, (1,) + sh).astype(np.float32) for sh, r in zip(shapes, ranges)]

    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = representative
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    if not float_io:
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    if per_tensor_dense:
        conv._experimental_disable_per_channel_quantization_for_dense_layers = True
    return conv.convert()


def _interpreter(tflite_bytes, reference=True):
    kwargs = {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF,
              "experimental_preserve_all_tensors": True} if reference else {}
    it = Interpreter(model_content=tflite_bytes, **kwargs)
    it.allocate_tensors()
    return it


def _invoke(it, xs, k):
    for d, x in zip(it.get_input_details(), xs):
        it.set_tensor(d["index"], x[k:k + 1])
    it.invoke()


def _run_tflite(it, xs):
    """Run batch-1 TFLite on each sample of the inputs ``xs`` (one [N, ...] array per model input);
    returns one stacked [N, ...] array per model output."""
    outs = it.get_output_details()
    ys = [[] for _ in outs]
    for k in range(len(xs[0])):
        _invoke(it, xs, k)
        for y, d in zip(ys, outs):
            y.append(it.get_tensor(d["index"])[0].copy())
    return [np.stack(y) for y in ys]


def _inputs(it, n, rng):
    """One [n, ...] array per model input: half full-range random int8, half quantized
    uniform(-1, 1) values (uniform floats for a float input)."""
    xs = []
    for inp in it.get_input_details():
        shape = tuple(inp["shape"][1:])
        if inp["dtype"] == np.float32:
            xs.append(rng.uniform(-1.5, 1.5, (n,) + shape).astype(np.float32))
            continue
        scale, zp = inp["quantization"]
        full = rng.integers(-128, 128, (n - n // 2,) + shape).astype(np.int8)
        real = np.clip(np.round(rng.uniform(-1, 1, (n // 2,) + shape) / scale) + zp, -128, 127)
        xs.append(np.concatenate([full, real.astype(np.int8)]))
    return xs


def _output_steps(graph):
    """One output quantum per model output: 1 for int8, the DEQUANTIZE input scale for float."""
    steps = []
    for t in graph.outputs:
        if graph.tensors[t].dtype == "int8":
            steps.append(1.0)
        else:
            deq = next(op for op in graph.ops if op["outputs"] == [t] and op["op"] == "DEQUANTIZE")
            steps.append(graph.tensors[deq["inputs"][0]].s)
    return steps


def _xnnpack_report(name, refs, xnns, steps):
    """Print how often the default (XNNPACK) resolver differs from the reference kernels."""
    diff = np.concatenate([np.abs(r.astype(np.float64) - x.astype(np.float64)).ravel() / step
                           for r, x, step in zip(refs, xnns, steps)])
    frac = float(np.mean(diff >= 0.5))
    one = float(np.mean((diff >= 0.5) & (diff < 1.5)))
    print(f"\n[xnnpack vs reference] {name}: {frac:.2%} of {diff.size} outputs differ, {one:.2%} by "
          f"one step, max {float(diff.max()):.0f} steps")
    return frac


def _assert_all_tensors_equal(name, graph, ref_it, xs):
    """Every int8/float32 tensor produced by an op equals the reference interpreter's, per sample.
    The graph runs the whole batch at once, the interpreter one sample at a time."""
    env = graph.run(xs if len(xs) > 1 else xs[0], return_tensors=True)
    checked = 0
    for k in range(len(xs[0])):
        _invoke(ref_it, xs, k)
        for idx, op in enumerate(graph.ops):
            for t in op["outputs"]:
                if graph.tensors[t].dtype not in ("int8", "float32"):
                    continue  # int32 shape arithmetic depends on the batch size
                ref = ref_it.get_tensor(t)
                mine = env[t][k:k + 1].reshape(ref.shape)
                if mine.dtype != ref.dtype or not np.array_equal(mine, ref):
                    bad = np.argwhere(mine != ref)
                    pytest.fail(
                        f"{name}: op #{idx} {op['op']} output tensor {t} differs from BUILTIN_REF on sample "
                        f"{k} at {len(bad)} of {ref.size} values (first {bad[:3].tolist()}: ref "
                        f"{ref[tuple(bad[0])]}, got {mine[tuple(bad[0])]})")
                checked += 1
    assert checked > 0
    return env


def _check_exact(name, tflite_bytes, expect_ops=(), n=6, seed=0, xs=None):
    graph = IntegerGraph.from_tflite(tflite_bytes)
    op_names = {op["op"] for op in graph.ops}
    missing = set(expect_ops) - op_names
    assert not missing, f"{name}: converter did not emit {missing}; graph has {sorted(op_names)}"
    ref_it = _interpreter(tflite_bytes, reference=True)
    rng = np.random.default_rng(seed)
    xs = xs if xs is not None else _inputs(ref_it, n, rng)
    if xs[0].dtype == np.float32:
        # put half of the float samples exactly on half steps of the input QUANTIZE: ties must round
        # away from zero like TfLiteRound
        q = next(op for op in graph.ops if op["op"] == "QUANTIZE" and op["inputs"][0] == graph.inputs[0])
        step = np.float32(graph.tensors[q["outputs"][0]].s)
        half = (rng.integers(-120, 120, xs[0][n // 2:].shape) + 0.5).astype(np.float32)
        xs[0][n // 2:] = half * step
    refs = _run_tflite(ref_it, xs)
    mine = graph.run(xs if len(xs) > 1 else xs[0])
    mine = mine if isinstance(mine, list) else [mine]
    assert len(mine) == len(refs)
    for j, (m, r) in enumerate(zip(mine, refs)):
        assert m.dtype == r.dtype and m.shape == r.shape, (j, m.dtype, r.dtype, m.shape, r.shape)
        np.testing.assert_array_equal(m, r, err_msg=f"{name}: output {j} differs from BUILTIN_REF")
    _assert_all_tensors_equal(name, graph, ref_it, xs)
    xnn_it = _interpreter(tflite_bytes, reference=False)
    _xnnpack_report(name, refs, _run_tflite(xnn_it, xs), _output_steps(graph))
    return graph


def _randomize_bn(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.2, b.shape),
                               rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 2.0, v.shape)])
    return model


_BIAS = keras.initializers.RandomNormal(stddev=0.1, seed=3)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

def _conv_bn_relu():
    i = L.Input((10, 10, 3))
    x = L.Conv2D(8, 3, padding="same", use_bias=False)(i)
    x = L.BatchNormalization()(x)
    x = L.ReLU()(x)
    x = L.Conv2D(6, 3, strides=2, padding="valid", activation=tf.nn.relu6, bias_initializer=_BIAS)(x)
    x = L.Conv2D(5, 2, strides=1, padding="same", bias_initializer=_BIAS)(x)
    return _randomize_bn(keras.Model(i, x))


def _depthwise():
    i = L.Input((9, 9, 4))
    x = L.DepthwiseConv2D(3, depth_multiplier=1, padding="same", bias_initializer=_BIAS)(i)
    x = L.ReLU()(x)
    x = L.DepthwiseConv2D(3, depth_multiplier=2, strides=2, padding="valid", bias_initializer=_BIAS)(x)
    x = L.DepthwiseConv2D(5, depth_multiplier=1, strides=2, padding="same", use_bias=False)(x)
    return keras.Model(i, x)


def _dense():
    i = L.Input((6, 6, 2))
    x = L.Flatten()(i)
    x = L.Dense(128, activation="relu", bias_initializer=_BIAS)(x)
    x = L.Dense(32, bias_initializer=_BIAS)(x)
    return keras.Model(i, x)


def _dense_narrow():
    """Small fan-in: large requantization multipliers (shift ~ -3), where the rounding of the
    FULLY_CONNECTED output stage is visible on many outputs."""
    i = L.Input((3,))
    return keras.Model(i, L.Dense(256, bias_initializer=_BIAS)(i))


def _residual():
    i = L.Input((8, 8, 4))
    a = L.Conv2D(4, 3, padding="same", bias_initializer=_BIAS)(i)
    b = L.Conv2D(4, 1, bias_initializer=_BIAS)(i)
    x = L.Add()([a, i])
    x = L.ReLU()(x)
    y = L.Subtract()([x, b])
    return keras.Model(i, L.Add()([y, L.Conv2D(4, 1)(y)]))


def _squeeze_excite():
    i = L.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", activation="relu", bias_initializer=_BIAS)(i)
    s = L.GlobalAveragePooling2D(keepdims=True)(x)
    s = L.Dense(4, activation="relu", bias_initializer=_BIAS)(s)
    s = L.Dense(8, activation="sigmoid", bias_initializer=_BIAS)(s)
    x = L.Multiply()([x, s])  # [N,8,8,8] * [N,1,1,8]
    s2 = L.GlobalAveragePooling2D(keepdims=True)(x)
    s2 = L.Conv2D(8, 1, activation="hard_sigmoid")(s2)
    return keras.Model(i, L.Multiply()([x, s2]))


def _concat_pool():
    i = L.Input((12, 12, 3))
    a = L.Conv2D(4, 3, padding="same", bias_initializer=_BIAS)(i)
    b = L.Conv2D(6, 1, bias_initializer=_BIAS)(i)
    x = L.Concatenate()([a, b])
    x = L.MaxPool2D(2)(x)
    x = L.MaxPool2D(3, strides=2, padding="same")(x)
    x = L.AveragePooling2D(3, strides=1, padding="same")(x)
    x = L.AveragePooling2D(2, padding="valid")(x)
    x = L.Conv2D(4, 1)(x)
    x = L.GlobalAveragePooling2D()(x)
    # pooling straight on the (full-range, signed) input exercises negative sums and padding
    p1 = L.AveragePooling2D(3, strides=2, padding="same")(i)
    p2 = L.MaxPool2D(3, strides=2, padding="same")(i)
    p3 = L.GlobalAveragePooling2D(keepdims=True)(i)
    return keras.Model(i, [x, p1, p2, p3])


def _reshape_pad():
    i = L.Input((7, 7, 2))
    x = L.ZeroPadding2D(((1, 2), (0, 1)))(i)
    x = L.Conv2D(3, 3, activation="relu", bias_initializer=_BIAS)(x)
    x = L.Reshape((-1, 3))(x)
    x = L.Reshape((6, 8, 3))(x)  # 8x6x3 -> 48x3 -> 6x8x3
    x = L.Conv2D(2, 1)(x)
    x = L.Reshape((-1,))(x)  # shape computed at run time: SHAPE, STRIDED_SLICE, PACK
    x = L.ReLU()(x)  # standalone RELU
    return keras.Model(i, L.Dense(5, bias_initializer=_BIAS)(x))


def _activations():
    i = L.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", bias_initializer=_BIAS)(i)
    x = L.Activation("swish")(x)
    x = L.Conv2D(8, 1, bias_initializer=_BIAS)(x)
    x = L.Lambda(lambda v: v * tf.nn.relu6(v + 3.0) / 6.0)(x)  # hard swish
    x = L.MaxPool2D(2)(x)
    y = L.Conv2D(6, 1, bias_initializer=_BIAS)(x)
    y = L.Activation("sigmoid")(y)
    z = L.Conv2D(6, 1, bias_initializer=_BIAS)(x)
    z = L.Activation("tanh")(z)
    x = L.Concatenate()([y, z])
    x = L.ReLU(6.0)(x)  # standalone RELU6: TFLite concatenation takes no fused activation
    x = L.Conv2D(6, 1, bias_initializer=_BIAS)(x)
    x = L.LeakyReLU(0.2)(x)
    x = L.GlobalAveragePooling2D()(x)
    x = L.Dense(7, bias_initializer=_BIAS)(x)
    return keras.Model(i, L.Softmax()(x))


CASES = {
    # name: (builder, converter kwargs, ops that must appear)
    "conv_bn_relu": (_conv_bn_relu, {}, ["CONV_2D"]),
    "depthwise_dm1_dm2": (_depthwise, {}, ["DEPTHWISE_CONV_2D"]),
    "dense_per_channel": (_dense, {}, ["FULLY_CONNECTED"]),
    "dense_per_tensor": (_dense, {"per_tensor_dense": True}, ["FULLY_CONNECTED"]),
    "dense_narrow_per_channel": (_dense_narrow, {}, ["FULLY_CONNECTED"]),
    "dense_narrow_per_tensor": (_dense_narrow, {"per_tensor_dense": True}, ["FULLY_CONNECTED"]),
    "residual_add_sub": (_residual, {}, ["ADD", "SUB"]),
    "squeeze_excite": (_squeeze_excite, {}, ["MUL", "MEAN", "LOGISTIC", "FULLY_CONNECTED"]),
    "concat_pool": (_concat_pool, {}, ["CONCATENATION", "MAX_POOL_2D", "AVERAGE_POOL_2D", "MEAN"]),
    "reshape_pad": (_reshape_pad, {}, ["PAD", "RESHAPE", "RELU"]),
    "activations_softmax": (_activations, {},
                            ["HARD_SWISH", "LOGISTIC", "TANH", "RELU6", "LEAKY_RELU", "SOFTMAX",
                             "QUANTIZE"]),
    "float_io": (_conv_bn_relu, {"float_io": True}, ["QUANTIZE", "DEQUANTIZE"]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_kernels(name):
    builder, kwargs, expect = CASES[name]
    keras.utils.set_random_seed(0)
    tflite_bytes = _convert(builder(), **kwargs)
    _check_exact(name, tflite_bytes, expect_ops=expect, n=64 if name.startswith("dense") else 6)


def test_dense_per_tensor_weights_are_per_tensor():
    keras.utils.set_random_seed(0)
    graph = IntegerGraph.from_tflite(_convert(_dense(), per_tensor_dense=True))
    fcs = [op for op in graph.ops if op["op"] == "FULLY_CONNECTED"]
    assert fcs and all(graph.tensors[op["inputs"][1]].scale.size == 1 for op in fcs)


def test_unary_ops_exhaustive():
    """HARD_SWISH, LOGISTIC, TANH, RELU6, LEAKY_RELU on all 256 int8 inputs."""
    keras.utils.set_random_seed(0)
    i = L.Input((256,))
    outs = [L.Lambda(lambda v: v * tf.nn.relu6(v + 3.0) / 6.0)(i), L.Activation("sigmoid")(i),
            L.Activation("tanh")(i), L.ReLU(6.0)(i), L.LeakyReLU(0.3)(i)]
    b = _convert(keras.Model(i, outs), ranges=[4.0])
    x = np.arange(-128, 128, dtype=np.int8)[None]
    _check_exact("unary_exhaustive", b, ["HARD_SWISH", "LOGISTIC", "TANH", "RELU6", "LEAKY_RELU"], xs=[x])


def test_binary_ops_exhaustive():
    """ADD, SUB, MUL on all 65,536 int8 pairs, inputs with different scales and zero points."""
    keras.utils.set_random_seed(0)
    a, c = L.Input((256, 256)), L.Input((256, 256))
    model = keras.Model([a, c], [L.Add()([a, c]), L.Subtract()([a, c]), L.Multiply()([a, c])])
    b = _convert(model, ranges=[1.0, 3.0])
    grid = np.arange(-128, 128, dtype=np.int8)
    x1 = np.broadcast_to(grid[:, None], (256, 256))[None].copy()
    x2 = np.broadcast_to(grid[None, :], (256, 256))[None].copy()
    graph = _check_exact("binary_exhaustive", b, ["ADD", "SUB", "MUL"], xs=[x1, x2])
    scales = {graph.tensors[t].s for t in graph.inputs}
    assert len(scales) == 2, "the two inputs should have different scales"


@pytest.mark.slow
def test_mobilenet_v3_small_matches_reference_kernels():
    """A whole MobileNetV3-Small (hard-swish, squeeze-excite, residual adds; ~100 ops, ~25 s)."""
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), weights=None, include_top=False,
                                                pooling="avg", include_preprocessing=False)
    # Untrained statistics make the activations collapse to scales ~1e-8; random BN keeps them alive.
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            g, b, m, v = layer.get_weights()
            layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.2, b.shape),
                               np.zeros_like(m), rng.uniform(0.025, 0.1, v.shape)])
    _check_exact("mobilenet_v3_small", _convert(model), expect_ops=["HARD_SWISH", "MUL", "ADD", "MEAN"], n=4)


# ------------------------------------------------------------------------------------------------
# fixed-point helpers against hand-computed values
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("real, expected", [
    (0.5, (1 << 30, 0)),
    (0.25, (1 << 30, -1)),
    (1.0, (1 << 30, 1)),
    (0.75, (3 << 29, 0)),
    (3.0, (3 << 29, 2)),
    (0.0, (0, 0)),
    (2.0 ** -40, (0, 0)),                              # below 2**-31: flushed to zero
    ((2 ** 30 + 0.5) / 2 ** 31, (2 ** 30 + 1, 0)),     # exactly half: rounds away from zero
    ((2 ** 30 + 1.5) / 2 ** 31, (2 ** 30 + 2, 0)),     # half again (not banker's rounding)
    (1.0 - 2.0 ** -33, (1 << 30, 1)),                  # rounds up to 2**31: halved, shift + 1
])
def test_quantize_multiplier(real, expected):
    assert quantize_multiplier(real) == expected


def test_quantize_multiplier_reconstructs_value():
    rng = np.random.default_rng(0)
    for r in rng.uniform(1e-6, 10, 200):
        m, s = quantize_multiplier(r)
        assert (1 << 30) <= m < (1 << 31)
        assert abs(m * 2.0 ** (s - 31) - r) <= r * 2.0 ** -30


def test_saturating_rounding_doubling_high_mul():
    srdhm = lambda a, b: int(saturating_rounding_doubling_high_mul(a, b))  # noqa: E731
    assert srdhm(3, 1 << 30) == 2            # 1.5 -> 2
    assert srdhm(-3, 1 << 30) == -1          # -1.5 -> -1: gemmlowp's nudge rounds negative ties up
    assert srdhm(INT32_MIN, INT32_MIN) == INT32_MAX   # the one overflowing case saturates
    assert srdhm(INT32_MAX, INT32_MAX) == INT32_MAX - 1
    assert srdhm(1000, 0) == 0


def test_rounding_divide_by_pot():
    x = np.array([5, -5, 6, -6, 7, -7, 4, -4])
    # ties (x = +-6 / 4 = +-1.5) round away from zero
    np.testing.assert_array_equal(rounding_divide_by_pot(x, 2), [1, -1, 2, -2, 2, -2, 1, -1])
    np.testing.assert_array_equal(rounding_divide_by_pot(np.array([3, -3]), 0), [3, -3])


def test_multiply_by_quantized_multiplier():
    mbqm = lambda acc, m, s: int(multiply_by_quantized_multiplier(acc, m, s))  # noqa: E731
    assert mbqm(100, 1 << 30, 0) == 50        # x 0.5
    assert mbqm(3, 1 << 30, -1) == 1          # 0.75 -> 1
    assert mbqm(-3, 1 << 30, -1) == -1        # -0.75 -> -1
    assert mbqm(2, 1 << 30, -1) == 1          # 0.5 -> 1 (away from zero)
    assert mbqm(-2, 1 << 30, -1) == -1        # -0.5 -> -1
    assert mbqm(1, 3 << 29, -1) == 1          # 0.375 -> 1: double rounding (0.75 -> 1, then 0.5 -> 1)
    assert mbqm(100, 1 << 30, 2) == 200       # x 2 via left shift
    # per-channel multipliers broadcast on the last axis
    acc = np.array([[10, 10, 10]])
    out = multiply_by_quantized_multiplier(acc, np.array([1 << 30] * 3), np.array([0, -1, 1]))
    np.testing.assert_array_equal(out, [[5, 3, 10]])


# ------------------------------------------------------------------------------------------------
# persistence and errors
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def activations_graph():
    keras.utils.set_random_seed(1)
    b = _convert(_activations())
    return b, IntegerGraph.from_tflite(b)


def test_save_load_round_trip(tmp_path, activations_graph):
    tflite_bytes, graph = activations_graph
    json_path, npz_path = graph.save(tmp_path / "model")
    assert os.path.exists(json_path) and os.path.exists(npz_path)
    with open(json_path) as f:
        meta = json.load(f)
    assert meta["format"] == "tfq.IntegerGraph" and meta["version"] == 1
    assert [o["op"] for o in meta["ops"]] == [o["op"] for o in graph.ops]
    assert any(len(o["params"].get("table", [])) == 256 for o in meta["ops"])

    loaded = IntegerGraph.load(str(tmp_path / "model.json"))
    assert loaded.inputs == graph.inputs and loaded.outputs == graph.outputs
    for k, v in graph.constants.items():
        assert loaded.constants[k].dtype == v.dtype and np.array_equal(loaded.constants[k], v)
    for k, t in graph.tensors.items():
        assert np.array_equal(loaded.tensors[k].scale, t.scale) and loaded.tensors[k].scale.dtype == np.float32
    it = _interpreter(tflite_bytes)
    xs = _inputs(it, 4, np.random.default_rng(5))
    np.testing.assert_array_equal(loaded.run(xs[0]), graph.run(xs[0]))
    np.testing.assert_array_equal(loaded.run(xs[0]), _run_tflite(it, xs)[0])


def test_run_rejects_float_input_for_int8_model(activations_graph):
    _, graph = activations_graph
    with pytest.raises(TypeError, match="int8"):
        graph.run(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(IntegerGraphError, match="shape"):
        graph.run(np.zeros((1, 9, 8, 3), np.int8))


def test_unsupported_op_is_named_with_its_index():
    keras.utils.set_random_seed(0)
    i = L.Input((4, 4, 2))
    x = L.Conv2D(2, 1)(i)
    x = L.UpSampling2D(2)(x)  # RESIZE_NEAREST_NEIGHBOR
    b = _convert(keras.Model(i, x))
    with pytest.raises(UnsupportedOpError, match=r"TFLite op #\d+ RESIZE_NEAREST_NEIGHBOR"):
        IntegerGraph.from_tflite(b)

    spec = TensorSpec("x", [1, 4], "int8", [0.1], [0])
    with pytest.raises(UnsupportedOpError, match="op #0 FANCY_OP"):
        IntegerGraph([{"op": "FANCY_OP", "inputs": [0], "outputs": [1]}], {0: spec, 1: spec}, [0], [1])


def test_float_model_is_rejected():
    keras.utils.set_random_seed(0)
    i = L.Input((4, 4, 2))
    model = keras.Model(i, L.Conv2D(2, 1)(i))
    float_bytes = tf.lite.TFLiteConverter.from_keras_model(model).convert()  # no quantization
    with pytest.raises(IntegerGraphError, match=r"op #0 CONV_2D: input 0 .* float32"):
        IntegerGraph.from_tflite(float_bytes)
