"""IntegerGraph ``arithmetic="xnnpack"`` against LiteRT's XNNPACK delegate, and the teacher-forced
divergence locator (``tfq.export.verify.locate_divergence``).

One-op int8 TFLite models are written directly with the flatbuffer schema (exact scales, zero points,
weights and biases), run through LiteRT with its default XNNPACK delegate and with the reference
kernels, and compared with the IntegerGraph in both arithmetics. The inputs are every int8 code
(pair), or accumulators/sums chosen where candidate formulas round differently, so a formula that is
only approximately XNNPACK's fails.
"""
import flatbuffers
import numpy as np
import pytest
from ai_edge_litert import schema_py_generated as schema
from ai_edge_litert.interpreter import Interpreter, OpResolverType

import tfq  # noqa: F401  (Keras 2 before TensorFlow)
from tfq.export import integer
from tfq.export.integer import IntegerGraph, quantize_multiplier

F32 = np.float32
CODES = np.arange(-128, 128)
PAIRS_A = np.repeat(CODES, 256)
PAIRS_B = np.tile(CODES, 256)
_TYPES = {"int8": schema.TensorType.INT8, "int32": schema.TensorType.INT32, "float32": schema.TensorType.FLOAT32}
_VERSIONS = {"CONV_2D": 3, "DEPTHWISE_CONV_2D": 3, "FULLY_CONNECTED": 4, "MUL": 2, "ADD": 2, "SUB": 2, "MEAN": 2,
             "QUANTIZE": 2, "LEAKY_RELU": 2, "LOGISTIC": 2}


# ------------------------------------------------------------------------------------------------
# one-op models
# ------------------------------------------------------------------------------------------------

def _tensor(shape, dtype="int8", scale=None, zero_point=0, data=None, axis=0):
    return {"shape": list(shape), "dtype": dtype, "scale": scale, "zero_point": zero_point, "data": data, "axis": axis}


def _model(op, tensors, inputs, outputs, options=None):
    """A one-op TFLite flatbuffer; graph inputs are the op inputs without data."""
    model = schema.ModelT()
    model.version = 3
    model.buffers = [schema.BufferT()]
    graph = schema.SubGraphT()
    graph.tensors = []
    for i, t in enumerate(tensors):
        tensor = schema.TensorT()
        tensor.shape, tensor.type, tensor.name = t["shape"], _TYPES[t["dtype"]], f"t{i}".encode()
        if t["scale"] is not None:
            q = schema.QuantizationParametersT()
            q.scale = [float(v) for v in np.atleast_1d(t["scale"])]
            q.zeroPoint = [int(v) for v in np.broadcast_to(t["zero_point"], len(q.scale))]
            q.quantizedDimension = t["axis"]
            tensor.quantization = q
        buffer = schema.BufferT()
        if t["data"] is not None:
            buffer.data = np.frombuffer(np.ascontiguousarray(t["data"]).tobytes(), np.uint8)
        model.buffers.append(buffer)
        tensor.buffer = len(model.buffers) - 1
        graph.tensors.append(tensor)
    code = schema.OperatorCodeT()
    code.builtinCode = getattr(schema.BuiltinOperator, op)
    code.deprecatedBuiltinCode = min(code.builtinCode, 127)
    code.version = _VERSIONS.get(op, 1)
    model.operatorCodes = [code]
    operator = schema.OperatorT()
    operator.opcodeIndex, operator.inputs, operator.outputs = 0, list(inputs), list(outputs)
    if options is not None:
        operator.builtinOptionsType = getattr(schema.BuiltinOptions, type(options).__name__[:-1])
        operator.builtinOptions = options
    graph.operators = [operator]
    graph.inputs = [i for i in inputs if tensors[i]["data"] is None]
    graph.outputs = list(outputs)
    model.subgraphs = [graph]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _litert(flat, xs, runtime):
    """Output of the one-op model in LiteRT (``runtime``: "xnnpack" = default, or "reference") and
    whether the XNNPACK delegate took the op."""
    kwargs = {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF} if runtime == "reference" else {}
    interp = Interpreter(model_content=flat, **kwargs)
    interp.allocate_tensors()
    for detail, x in zip(interp.get_input_details(), xs):
        interp.set_tensor(detail["index"], np.asarray(x).astype(detail["dtype"]).reshape(detail["shape"]))
    interp.invoke()
    delegated = any(o["op_name"] == "DELEGATE" for o in interp._get_ops_details())
    return interp.get_tensor(interp.get_output_details()[0]["index"]).copy(), delegated


def _check(flat, xs, expect_delegated=True, expect_reference_differs=True):
    """IntegerGraph xnnpack == LiteRT XNNPACK and reference == LiteRT reference, bit for bit.
    Returns (xnnpack output, IntegerGraph reference output)."""
    xnn, delegated = _litert(flat, xs, "xnnpack")
    ref, _ = _litert(flat, xs, "reference")
    graph = IntegerGraph.from_tflite(flat)
    ig_inputs = [np.asarray(x).reshape(graph.tensors[t].shape).astype(graph.tensors[t].dtype)
                 for x, t in zip(xs, graph.inputs)]
    ig_xnn = graph.run(ig_inputs, arithmetic="xnnpack")
    ig_ref = graph.run(ig_inputs)
    assert delegated == expect_delegated
    own_arithmetic = delegated and graph.ops[0]["op"] in integer.XNNPACK_ARITHMETIC_OPS
    assert graph.xnnpack_arithmetic_ops() == ([0] if own_arithmetic else [])
    np.testing.assert_array_equal(ig_ref, ref)
    mismatch = np.nonzero(ig_xnn.reshape(-1) != xnn.reshape(-1))[0]
    assert mismatch.size == 0, (mismatch[:10], ig_xnn.reshape(-1)[mismatch[:10]], xnn.reshape(-1)[mismatch[:10]])
    if expect_reference_differs:
        assert np.any(ig_ref != ig_xnn), "the test inputs do not tell the two arithmetics apart"
    return xnn.reshape(-1).astype(np.int64), ig_ref


# ------------------------------------------------------------------------------------------------
# MEAN
# ------------------------------------------------------------------------------------------------

def _mean_model(side, channels, s_in, z_in, s_out, z_out):
    tensors = [_tensor([1, side, side, channels], "int8", s_in, z_in),
               _tensor([2], "int32", data=np.array([1, 2], np.int32)),
               _tensor([1, channels], "int8", s_out, z_out)]
    options = schema.ReducerOptionsT()
    options.keepDims = False
    return _model("MEAN", tensors, [0, 1], [2], options)


def _codes_with_sums(sums, n):
    """[1, sqrt(n), sqrt(n), len(sums)] int8 codes whose sum over the spatial axes is ``sums``."""
    x = np.zeros((n, len(sums)), np.int64)
    rest = np.asarray(sums, np.int64).copy()
    for k in range(n):
        x[k] = np.clip(np.round(rest / (n - k)), -128, 127)
        rest -= x[k]
    assert not rest.any()
    side = int(round(n ** 0.5))
    return x.reshape(1, side, side, -1).astype(np.int8)


@pytest.mark.parametrize("s_in,z_in,s_out,z_out", [(0.158, 17, 0.02, -9), (0.0713, -101, 0.009, 12),
                                                   (0.2436, 64, 0.0301, -127)])
def test_mean_7x7_matches_xnnpack_on_every_sum(s_in, z_in, s_out, z_out):
    """MEAN over 7x7 (n=49) with s_in/s_out ~ 7.9 (the global pooling of mobile_swish): every
    channel sum that lands in the int8 range. The reference kernel's fixed-point multiplier moves
    ~10-20% of the outputs by one step; XNNPACK rounds once."""
    n = 49
    lo = int(np.floor((-140 / (s_in / s_out)) * n)) + n * z_in
    hi = int(np.ceil((140 / (s_in / s_out)) * n)) + n * z_in
    sums = np.arange(max(lo, -128 * n), min(hi, 127 * n))
    xnn, ig_ref = _check(_mean_model(7, len(sums), s_in, z_in, s_out, z_out), [_codes_with_sums(sums, n)])
    assert 0.05 < np.mean(xnn != ig_ref.reshape(-1)) < 0.4


def test_mean_zero_points_enter_before_the_rounding():
    """n=16 with s_in/s_out = 8: the mean of the codes is an exact multiple of 1/2, so a tie decides.
    XNNPACK adds the output zero point in float32 before rounding half to even: with an odd z_out,
    ``round(sum (x - z_in) * M) + z_out`` misses every tie (checked against LiteRT here)."""
    n, s_in, s_out, z_in, z_out = 16, 0.5, 0.0625, 3, -5
    sums = np.arange(-200, 200) + n * z_in
    flat = _mean_model(4, len(sums), s_in, z_in, s_out, z_out)
    xnn, _ = _check(flat, [_codes_with_sums(sums, n)])
    m = F32(F32(s_in / s_out) * F32(1 / 16))
    rounded_then_shifted = np.clip(np.rint((sums - n * z_in) * float(m)) + z_out, -128, 127)
    ties = (sums - n * z_in) % 2 == 1
    assert ties.sum() == 200
    np.testing.assert_array_equal(xnn[ties] != rounded_then_shifted[ties], True)
    np.testing.assert_array_equal(xnn[~ties], rounded_then_shifted[~ties])


# ------------------------------------------------------------------------------------------------
# elementwise ops on every code pair
# ------------------------------------------------------------------------------------------------

def _binary_model(op, s1, z1, s2, z2, s_out, z_out):
    tensors = [_tensor([1, 65536], "int8", s1, z1), _tensor([1, 65536], "int8", s2, z2),
               _tensor([1, 65536], "int8", s_out, z_out)]
    options = {"MUL": schema.MulOptionsT, "ADD": schema.AddOptionsT, "SUB": schema.SubOptionsT}[op]()
    return _model(op, tensors, [0, 1], [2], options)


@pytest.mark.parametrize("op,scales,zero_points", [
    ("MUL", (0.0426, 1 / 256, 0.0223), (-1, -128, -116)),      # swish: x * sigmoid(x)
    ("MUL", (0.0713, 0.0331, 0.0419), (25, -7, 3)),
    ("MUL", (2 ** -4, 2 ** -4, 2 ** -3), (0, 0, 1)),         # exact ties, odd z_out: half to even, then + z_out
    ("ADD", (0.0329, 0.0161, 0.0402), (-117, -115, 9)),
    ("ADD", (2 ** -4, 2 ** -4, 2 ** -3), (0, 0, 1)),         # ties: XNNPACK rounds halves up
    ("SUB", (0.0211, 0.0507, 0.0333), (40, -3, -77)),
    ("SUB", (2 ** -4, 2 ** -5, 2 ** -3), (3, -1, 0)),
])
def test_binary_ops_match_xnnpack_on_every_code_pair(op, scales, zero_points):
    """At A8 scales ADD/SUB differ from the reference kernels on a few pairs in 10^5 (they may not
    here), on ties (power-of-two scales) on many."""
    (s1, s2, so), (z1, z2, zo) = scales, zero_points
    dyadic = all(np.log2(s) == int(np.log2(s)) for s in scales)
    _check(_binary_model(op, s1, z1, s2, z2, so, zo), [PAIRS_A, PAIRS_B],
           expect_reference_differs=op == "MUL" or dyadic)


@pytest.mark.parametrize("op,ratio,delegated", [("ADD", 255.999, True),
                                                 ("ADD", 2.0 ** -10, True), ("ADD", 2.0 ** -10 * 0.999, False),
                                                 ("MUL", 255.999, True),
                                                 ("MUL", 2.0 ** -16, True), ("MUL", 2.0 ** -16 * 0.999, False)])
def test_scale_limits_of_the_delegate(op, ratio, delegated):
    """Outside the scale ratios XNNPACK accepts the op stays in the builtin kernels, and the
    IntegerGraph computes it with the reference arithmetic there. (Ratios of 256 and more are left
    out: there LiteRT's builtin ADD/MUL saturate where the reference kernels wrap around.)"""
    scales = (0.01 * ratio, 0.01, 0.01) if op == "ADD" else (ratio, 1.0, 1.0)
    flat = _binary_model(op, scales[0], 3, scales[1], 0, scales[2], -2)
    _check(flat, [PAIRS_A, PAIRS_B], expect_delegated=delegated, expect_reference_differs=False)


def _unary_model(op, s_in, z_in, s_out, z_out, options=None, in_dtype="int8", size=256):
    tensors = [_tensor([1, size], in_dtype, s_in if in_dtype == "int8" else None, z_in),
               _tensor([1, size], "int8", s_out, z_out)]
    return _model(op, tensors, [0], [1], options)


@pytest.mark.parametrize("s_in,z_in,s_out,z_out", [(0.0391, 17, 0.0207, -3), (0.0113, -90, 0.0871, 51)])
def test_requantizing_quantize_and_leaky_relu_match_xnnpack(s_in, z_in, s_out, z_out):
    _check(_unary_model("QUANTIZE", s_in, z_in, s_out, z_out), [CODES])
    options = schema.LeakyReluOptionsT()
    options.alpha = 0.2
    _check(_unary_model("LEAKY_RELU", s_in, z_in, s_out, z_out, options), [CODES])


def test_float_quantize_rounds_x_times_the_reciprocal_half_to_even():
    """float -> int8 QUANTIZE near every tie: XNNPACK rounds ``x * float32(1 / s)`` half to even,
    the reference kernel ``x / s`` half away from zero."""
    rng = np.random.default_rng(0)
    s, z = F32(0.0173), 9
    ties = ((rng.integers(-120, 110, 4000) + 0.5) * s).astype(F32)
    x = np.concatenate([ties, np.nextafter(ties, F32(np.inf)), np.nextafter(ties, F32(-np.inf))])
    _check(_unary_model("QUANTIZE", None, 0, s, z, in_dtype="float32", size=x.size), [x])


def test_logistic_is_the_reference_table_under_xnnpack():
    """LOGISTIC runs inside XNNPACK with the same results as the reference table (so the
    IntegerGraph keeps the reference kernel for it)."""
    flat = _unary_model("LOGISTIC", 0.0537, -11, 1 / 256, -128)
    _check(flat, [CODES], expect_reference_differs=False)
    assert IntegerGraph.from_tflite(flat).xnnpack_arithmetic_ops() == []
    assert "LOGISTIC" in integer.XNNPACK_REFERENCE_EQUAL_OPS


# ------------------------------------------------------------------------------------------------
# convolutions and fully connected: requantization scale and ties
# ------------------------------------------------------------------------------------------------

def _weighted_model(op, s_in, z_in, s_w, bias, s_out, z_out, weights, rows):
    """``op`` on an input of ``rows`` values with one input channel: FULLY_CONNECTED [rows, 1],
    CONV_2D / DEPTHWISE_CONV_2D [1, rows, 1, 1] with 1x1 kernels; ``weights`` per output channel."""
    units = len(weights)
    s_w = np.broadcast_to(np.asarray(s_w, np.float64), (units,))
    bias_t = _tensor([units], "int32", s_in * s_w, np.zeros(units, int), np.asarray(bias, np.int32))
    if op == "FULLY_CONNECTED":
        tensors = [_tensor([rows, 1], "int8", s_in, z_in),
                   _tensor([units, 1], "int8", s_w, np.zeros(units, int),
                           np.asarray(weights, np.int8).reshape(units, 1)),
                   bias_t, _tensor([rows, units], "int8", s_out, z_out)]
        return _model(op, tensors, [0, 1, 2], [3], schema.FullyConnectedOptionsT())
    shape = [units, 1, 1, 1] if op == "CONV_2D" else [1, 1, 1, units]
    tensors = [_tensor([1, rows, 1, 1], "int8", s_in, z_in),
               _tensor(shape, "int8", s_w, np.zeros(units, int), np.asarray(weights, np.int8).reshape(shape),
                       0 if op == "CONV_2D" else 3),
               bias_t, _tensor([1, rows, 1, units], "int8", s_out, z_out)]
    options = schema.Conv2DOptionsT() if op == "CONV_2D" else schema.DepthwiseConv2DOptionsT()
    options.padding, options.strideH, options.strideW = schema.Padding.VALID, 1, 1
    options.dilationHFactor = options.dilationWFactor = 1
    if op == "DEPTHWISE_CONV_2D":
        options.depthMultiplier = units
    return _model(op, tensors, [0, 1, 2], [3], options)


@pytest.mark.parametrize("op", ["CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"])
def test_weighted_ops_use_the_float32_scale_of_the_scales(op):
    """A8 scales (multipliers ~1e-3): per channel the bias is chosen so that the 256 accumulators
    ``bias + (x - z_in)`` include one where ``round(acc * M)`` differs between
    ``M = float32(float32(s_in s_w) / s_out)`` and the float32 value of TFLite's fixed-point
    multiplier. XNNPACK uses the former: the latter (and the reference kernel) miss there."""
    rng = np.random.default_rng({"CONV_2D": 1, "DEPTHWISE_CONV_2D": 2, "FULLY_CONNECTED": 3}[op])
    units, s_in, s_out, z_out = 160, F32(0.0437), F32(3.21), -7
    s_w = rng.uniform(0.02, 0.12, units).astype(F32)
    scale = ((s_in * s_w).astype(F32) / s_out).astype(F32)
    fixed = np.array([F32(m * 2.0 ** (e - 31)) for m, e in
                      (quantize_multiplier(float(s_in) * float(w) / float(s_out)) for w in s_w)], F32)
    bias = np.zeros(units, np.int64)
    chosen = 0
    for c in range(units):
        acc = np.arange(-int(120 / scale[c]), int(120 / scale[c]))
        a = np.rint((acc.astype(F32) * scale[c]).astype(F32))
        b = np.rint((acc.astype(F32) * fixed[c]).astype(F32))
        differ = acc[a != b]
        if differ.size:
            bias[c], chosen = rng.choice(differ), chosen + 1
        else:
            bias[c] = rng.integers(-acc[-1], acc[-1])
    assert chosen >= 10
    flat = _weighted_model(op, s_in, 0, s_w, bias, s_out, z_out, np.ones(units), 256)
    xnn, _ = _check(flat, [CODES])
    acc = CODES[:, None] + bias[None, :]
    with_fixed = np.clip(np.rint((acc.astype(F32) * fixed).astype(F32)) + z_out, -128, 127).reshape(-1)
    assert np.sum(with_fixed != xnn) >= chosen


@pytest.mark.parametrize("op", ["CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"])
def test_weighted_ops_round_half_to_even_before_the_zero_point(op):
    """M = 2^-6 exactly: accumulators ``32 (2k + 1)`` are ties; XNNPACK rounds them half to even,
    then adds the (odd) output zero point."""
    units, z_out = 16, 3
    bias = (np.arange(units) - units // 2) * 256
    flat = _weighted_model(op, 2.0 ** -3, 0, 2.0 ** -4, bias, 2.0 ** -1, z_out, np.ones(units), 256)
    xnn, _ = _check(flat, [CODES])
    v = (CODES[:, None] + bias[None, :]) * 2.0 ** -6
    inside = np.abs(v.reshape(-1)) < 120
    assert np.sum(inside & (v.reshape(-1) % 1 == 0.5)) == 64
    np.testing.assert_array_equal(xnn[inside], (np.rint(v) + z_out).reshape(-1)[inside])


@pytest.mark.parametrize("op,activation", [("CONV_2D", "NONE"), ("DEPTHWISE_CONV_2D", "RELU6")])
def test_3x3_convolutions_on_random_codes(op, activation):
    """3x3 SAME convolutions with A8 scales, per-channel weights and biases, random codes."""
    rng = np.random.default_rng(5)
    cin, cout = (8, 16) if op == "CONV_2D" else (8, 8)
    s_in, z_in, s_out, z_out = 0.0312, -17, 0.0533 if activation == "RELU6" else 0.21, 11
    s_w = rng.uniform(0.002, 0.01, cout)
    w_shape = [cout, 3, 3, cin] if op == "CONV_2D" else [1, 3, 3, cout]
    weights = rng.integers(-127, 128, w_shape).astype(np.int8)
    bias = rng.integers(-3000, 3000, cout).astype(np.int32)
    tensors = [_tensor([1, 16, 16, cin], "int8", s_in, z_in),
               _tensor(w_shape, "int8", s_w, np.zeros(cout, int), weights, 0 if op == "CONV_2D" else 3),
               _tensor([cout], "int32", s_in * s_w, np.zeros(cout, int), bias),
               _tensor([1, 16, 16, cout], "int8", s_out, z_out)]
    options = schema.Conv2DOptionsT() if op == "CONV_2D" else schema.DepthwiseConv2DOptionsT()
    options.padding, options.strideH, options.strideW = schema.Padding.SAME, 1, 1
    options.dilationHFactor = options.dilationWFactor = 1
    options.fusedActivationFunction = getattr(schema.ActivationFunctionType, activation)
    if op == "DEPTHWISE_CONV_2D":
        options.depthMultiplier = 1
    flat = _model(op, tensors, [0, 1, 2], [3], options)
    differ = 0
    for seed in range(3):
        xnn, ig_ref = _check(flat, [np.random.default_rng(seed).integers(-128, 128, (1, 16, 16, cin))],
                             expect_reference_differs=False)
        differ += int(np.sum(xnn != ig_ref.reshape(-1)))
    assert differ > 0


def test_kernel_parts_ops_keep_their_exact_arithmetic():
    """A kernel-parts op (split PWLQ layer) is an IntegerGraph extension: both arithmetics give its
    one-rounding result, and it is not counted as an XNNPACK op."""
    rng = np.random.default_rng(3)
    units = 8
    flat = _weighted_model("FULLY_CONNECTED", 0.05, 2, rng.uniform(0.01, 0.02, units),
                           rng.integers(-500, 500, units), 0.07, -4, rng.integers(-127, 128, units), 256)
    graph = IntegerGraph.from_tflite(flat)
    assert graph.xnnpack_arithmetic_ops() == [0]
    codes = [(rng.integers(-127, 128, (units, 1)), np.full(units, 0.01)),
             (rng.integers(-127, 128, (units, 1)), np.full(units, 0.0007))]
    graph.set_kernel_parts(0, codes, rng.normal(0, 0.3, units))
    assert graph.xnnpack_arithmetic_ops() == []
    x = CODES.astype(np.int8).reshape(256, 1)
    np.testing.assert_array_equal(graph.run(x, arithmetic="xnnpack"), graph.run(x))


# ------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------

def test_bad_arithmetic_is_an_error_naming_the_allowed_values():
    flat = _unary_model("QUANTIZE", 0.02, 0, 0.03, 0)
    graph = IntegerGraph.from_tflite(flat)
    x = CODES.astype(np.int8)[None]
    for bad in ("XNNPACK", "builtin", None):
        with pytest.raises(ValueError, match=r"arithmetic must be one of 'reference', 'xnnpack'"):
            graph.run(x, arithmetic=bad)
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        graph.run_op(0, {graph.inputs[0]: x}, arithmetic="fast")
    with pytest.raises(IndexError, match="index must be an op index"):
        graph.run_op(1, {graph.inputs[0]: x})
    with pytest.raises(integer.IntegerGraphError, match="no array for input"):
        graph.run_op(0, {})
    np.testing.assert_array_equal(graph.run_op(0, {graph.inputs[0]: x}, "xnnpack")[0],
                                  graph.run(x, arithmetic="xnnpack"))


# ------------------------------------------------------------------------------------------------
# end to end: PTQ W8A8 mobile_swish
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ptq_mobile_swish():
    """mobile_swish PTQ'd to W8A8 (uniform, no bias correction) on 256 Fashion-MNIST images, biases
    snapped. The untrained net's BatchNorm statistics are first set from the same images
    (``reestimate_batch_norm``): with the initial ones the activations shrink block after block to
    the smallest activation scale, where swish MULs have power-of-two multipliers and Keras's
    rounding of exact ties decides most outputs."""
    import tf_keras as keras
    from tfq import data, models, train
    from tfq.export import snap_biases, to_tflite
    from tfq.ptq.pwlq import pwlq
    keras.utils.set_random_seed(0)
    net = models.mobile_swish()
    x_cal, _ = data.load_numpy("fashion_mnist", "train", limit=256)
    train.reestimate_batch_norm(net, x_cal)
    q = pwlq(net, x_cal, weight_bits=8, activation_bits=8, method="uniform", bias_correction=False)
    snap_biases(q)
    x_test, _ = data.load_numpy("fashion_mnist", "test", limit=64)
    return q, to_tflite(q), x_test


def test_verify_reports_integer_graph_equal_to_xnnpack(ptq_mobile_swish):
    from tfq.export import bench, verify
    q, flat, x = ptq_mobile_swish
    report = verify.verify(q, flat, x)
    for key in ("examples", "output_scale", "xnnpack", "reference", "integer_graph", "integer_graph_vs_reference",
                "xnnpack_partitions", "ops_outside_xnnpack", "op_counts"):
        assert key in report
    assert report["integer_graph_vs_reference"]["bit_exact"]
    assert report["integer_graph_vs_xnnpack"] == {"exact_matches": 640, "values": 640, "bit_exact": True}
    # the reference kernels round twice: they differ from XNNPACK on this model
    assert report["xnnpack"]["exact_share"] != report["reference"]["exact_share"]
    # the ops given XNNPACK arithmetic are exactly the delegated ones of those types
    graph = IntegerGraph.from_tflite(flat)
    coverage = bench.xnnpack_coverage(verify.run_tflite(flat, x[:1])[1]._get_ops_details())
    outside = {o["index"] for o in coverage["ops_outside_xnnpack"]}
    typed = {i for i, op in enumerate(graph.ops) if op["op"] in integer.XNNPACK_ARITHMETIC_OPS}
    assert set(graph.xnnpack_arithmetic_ops()) == typed - outside
    assert {graph.ops[i]["op"] for i in outside} <= set(integer.XNNPACK_UNDELEGATED_OPS)


def test_locate_divergence_is_zero_under_xnnpack_except_hard_swish(ptq_mobile_swish):
    """Teacher forced, each op against Keras: under XNNPACK arithmetic every op equals Keras up to
    convolution outputs within ~1e-5 of a tie (Keras's float32 sum rounds them the other way:
    at most ~1 value in 10^4) and HARD_SWISH (TFLite fixed point); the reference arithmetic moves
    MEAN outputs by a step on several percent of the values."""
    from tfq.export import verify
    q, flat, x = ptq_mobile_swish
    rows = verify.locate_divergence(q, flat, x[:32])
    graph = IntegerGraph.from_tflite(flat)
    assert [r["op_index"] for r in rows] == sorted(r["op_index"] for r in rows)
    assert {r["op"] for r in rows} >= {"CONV_2D", "DEPTHWISE_CONV_2D", "LOGISTIC", "MUL", "HARD_SWISH", "ADD", "MEAN"}
    assert len(rows) >= 35 and all(r["values"] > 0 and r["off_grid"] < 1e-3 for r in rows)
    assert all(graph.ops[r["op_index"]]["op"] == r["op"] for r in rows)
    for r in rows:
        if r["op"] == "HARD_SWISH":
            assert r["max_steps"] <= 1, r
        elif r["op"] in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            assert r["max_steps"] <= 1 and r["differing"] <= 2e-4, r
        else:
            assert r["differing"] == 0, r
    reference = verify.locate_divergence(q, flat, x[:32], arithmetic="reference")
    assert [r["op_index"] for r in reference] == [r["op_index"] for r in rows]
    assert max(r["differing"] for r in reference if r["op"] == "MEAN") > 0.02
    assert sum(r["differing"] for r in reference) > 10 * sum(r["differing"] for r in rows)
    with pytest.raises(ValueError, match="arithmetic must be one of"):
        verify.locate_divergence(q, flat, x[:2], arithmetic="builtin")
