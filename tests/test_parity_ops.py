"""Keras forward vs TFLite int8 kernels, op by op, on every int8 input code (docs/export.md, parity).

One-op TFLite models are run through the LiteRT interpreter with XNNPACK (the default runtime),
the builtin optimized kernels and the reference kernels; the Keras side is tfq's own forward.
"""
import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq.export import tflite as tfl
from tfq.export.integer import IntegerGraph
from tfq.quantizers import fixed
from tfq.quantizers.grid import UniformGrid

CODES = np.arange(-128, 128)
RUNTIMES = ("xnnpack", "builtin", "reference")


def _run(flat, codes, runtime):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    kwargs = {"xnnpack": {}, "builtin": {"experimental_op_resolver_type":
                                         OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES},
              "reference": {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF}}[runtime]
    interp = Interpreter(model_content=flat, **kwargs)
    interp.allocate_tensors()
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    interp.set_tensor(inp["index"], codes.reshape(inp["shape"]).astype(np.int8))
    interp.invoke()
    ops = [o["op_name"] for o in interp._get_ops_details()]
    return interp.get_tensor(out["index"]).reshape(-1).astype(np.int64), inp, out, ops


def _convert(model):
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return converter.convert()


def _sigmoid_flatbuffer(in_plan, out_plan):
    inputs = keras.Input((256,), batch_size=1)
    x = keras.layers.Lambda(lambda t: tfl.emit(t, in_plan))(inputs)
    y = keras.layers.Lambda(lambda t: tfl.emit(tf.sigmoid(t), out_plan))(x)
    return _convert(keras.Model(inputs, y))


@pytest.mark.parametrize("scale,zero_point", [(0.0218, 146), (0.0309, 135), (0.0069, 151), (0.1, 0),
                                              (0.05, 255), (0.0625, 128)])
def test_fixed_sigmoid_quantizer_equals_tflite_logistic_on_every_input_code(scale, zero_point):
    """tfq's forward for a sigmoid (input on its 8-bit grid, then FixedRangeQuantizer("sigmoid"))
    gives the int8 LOGISTIC kernel's output code for all 256 input codes, in every runtime."""
    in_grid = UniformGrid(scale=scale, zero_point=zero_point, bits=8, qmin=0, qmax=255)
    quantizer = fixed.FixedRangeQuantizer("sigmoid")
    out_grid = quantizer.integer_grid({})
    s_in, z_in, _, _ = in_grid.to_int8_container()
    s_out, z_out, _, _ = out_grid.to_int8_container()
    x = ((CODES - z_in) * s_in).astype(np.float32)
    keras_codes = np.round(np.asarray(quantizer(tf.sigmoid(tf.constant(x)), training=False, weights={}),
                                      np.float64) / s_out).astype(np.int64) + z_out
    flat = _sigmoid_flatbuffer(tfl.activation_plan(in_grid, "x"), tfl.activation_plan(out_grid, "y"))
    for runtime in RUNTIMES:
        codes, inp, out, ops = _run(flat, CODES, runtime)
        # XNNPACK takes the op over (a DELEGATE node is appended); the others run LOGISTIC itself
        assert ops == (["LOGISTIC", "DELEGATE"] if runtime == "xnnpack" else ["LOGISTIC"]), (runtime, ops)
        assert inp["quantization"][1] == z_in and out["quantization"] == (1 / 256, -128)
        mismatch = np.nonzero(codes != keras_codes)[0]
        assert mismatch.size == 0, (runtime, CODES[mismatch], codes[mismatch], keras_codes[mismatch])


def _hard_swish_model(scale_in, zero_in):
    """A quantized one-layer hard-swish model whose input grid is set by hand."""
    inputs = keras.Input((256,), name="x")
    outputs = keras.layers.Activation(tfq.models.hard_swish, name="act")(inputs)
    q = tfq.quantize_model(keras.Model(inputs, outputs), method="lsq+")
    xs = np.linspace((-128 - zero_in) * scale_in, (127 - zero_in) * scale_in, 256 * 8, dtype=np.float32)
    tfq.calibrate(q, xs.reshape(8, 256), steps=1)
    quant_in = [l for l in q.layers if type(l).__name__ == "QuantizeLayer"][0]
    qz, qvars = quant_in.quantizer, quant_in.quantizer_vars
    qz.assign_scale(qvars, np.float32(scale_in))
    qvars["offset"].assign(np.float32(-(zero_in + 128) * scale_in))  # unsigned codes: z = zero_in + 128
    return q, quant_in.quantizer.integer_grid(qvars)


@pytest.mark.parametrize("scale_in,zero_in,op_misses", [(0.0194, -108, 1), (0.0481, 1, 1), (0.0259, -114, 2)])
def test_exact_hard_swish_table_equals_keras_on_every_input_code(scale_in, zero_in, op_misses):
    """``exact_hard_swish=True`` exports the Keras hard-swish layer as an int8 table: TFLite gives
    Keras' own output code for all 256 input codes (XNNPACK and reference kernels), the graph
    holds no HARD_SWISH op, and the IntegerGraph equals the reference kernels. TFLite's
    HARD_SWISH op itself stays within one code of Keras but misses ``op_misses`` of the 256 codes
    (fixed-point arithmetic; measured on LiteRT 2.3, the same in all three runtimes)."""
    q, in_grid = _hard_swish_model(scale_in, zero_in)
    s_in, z_in, _, _ = in_grid.to_int8_container()
    assert z_in == zero_in and abs(s_in - scale_in) < 1e-7
    x = ((CODES - z_in) * s_in).astype(np.float32)[None]
    keras_out = np.asarray(q.predict(x, verbose=0), np.float64)
    exact = tfl.to_tflite(q, exact_hard_swish=True)
    for runtime in ("xnnpack", "reference"):
        codes, _, out, ops = _run(exact, CODES, runtime)
        assert "HARD_SWISH" not in ops, ops
        s_out, z_out = out["quantization"]
        np.testing.assert_array_equal(codes, np.round(keras_out[0] / s_out + z_out).astype(np.int64))
    ref, _, _, _ = _run(exact, CODES, "reference")
    np.testing.assert_array_equal(IntegerGraph.from_tflite(exact).run(CODES.astype(np.int8)[None])[0], ref)
    codes, _, out, ops = _run(tfl.to_tflite(q), CODES, "xnnpack")
    assert "HARD_SWISH" in ops, ops
    s_out, z_out = out["quantization"]
    diff = np.abs(codes - (keras_out[0] / s_out + z_out))
    assert np.max(diff) <= 1 + 1e-3
    assert int(np.sum(diff > 1e-3)) == op_misses


def test_exact_hard_swish_is_reported():
    q, _ = _hard_swish_model(0.03, -100)
    notes = {e["layer"]: e["note"] for e in tfl.export_report(q, exact_hard_swish=True)}
    assert "exact int8 table" in notes["quant_act"]
    assert "exact int8 table" not in {e["layer"]: e["note"] for e in tfl.export_report(q)}["quant_act"]


@pytest.mark.parametrize("scale_in,zero_in,op_misses", [(0.0194, -108, 1), (0.0259, -114, 2)])
def test_snap_hard_swish_makes_keras_equal_tflite_hard_swish_on_every_input_code(scale_in, zero_in, op_misses):
    """After ``snap_hard_swish`` the Keras layer returns TFLite's HARD_SWISH code for all 256 input
    codes (XNNPACK and reference kernels), the export still holds the fast HARD_SWISH op, the row
    counts the codes that moved, the gradient stays hard swish's, and save/load keeps the snap."""
    q, _ = _hard_swish_model(scale_in, zero_in)
    x = ((CODES - zero_in) * scale_in).astype(np.float32)[None]
    before = np.asarray(q.predict(x, verbose=0), np.float64)
    rows = tfl.snap_hard_swish(q)
    assert [(r["layer"], r["codes_moved"]) for r in rows] == [("quant_act", op_misses)]
    after = np.asarray(q.predict(x, verbose=0), np.float64)
    flat = tfl.to_tflite(q)
    for runtime in ("xnnpack", "reference"):
        codes, _, out, ops = _run(flat, CODES, runtime)
        assert "HARD_SWISH" in ops, ops
        s_out, z_out = out["quantization"]
        np.testing.assert_array_equal(codes, np.round(after[0] / s_out + z_out).astype(np.int64))
    assert int(np.sum(np.abs(after - before) > 1e-3 * s_out)) == op_misses
    inner = q.get_layer("quant_act").layer
    xt = tf.constant(np.linspace(-4, 4, 33, dtype=np.float32) + 0.01)  # off the kinks at +-3
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = inner.activation(xt)
    expected = np.where(xt < -3, 0.0, np.where(xt > 3, 1.0, (2 * xt.numpy() + 3) / 6))
    np.testing.assert_allclose(tape.gradient(y, xt).numpy(), expected, atol=1e-6)
    path = tfq_tmp_h5(q)
    with tfq.quantize_scope():
        loaded = keras.models.load_model(path, compile=False)
        rebuilt = keras.layers.Activation.from_config(inner.get_config())  # the new-style config path
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), after)
    np.testing.assert_array_equal(rebuilt(x).numpy(), inner(x).numpy())


def tfq_tmp_h5(model):
    import os
    import tempfile
    path = os.path.join(tempfile.mkdtemp(), "snapped.h5")
    model.save(path)
    return path


def test_snapped_hard_swish_refuses_export_after_its_grids_moved():
    q, _ = _hard_swish_model(0.03, -100)
    tfl.snap_hard_swish(q)
    quant_in = [l for l in q.layers if type(l).__name__ == "QuantizeLayer"][0]
    quant_in.quantizer.assign_scale(quant_in.quantizer_vars, np.float32(0.031))
    with pytest.raises(tfl.ExportError, match="quant_act: snap_hard_swish was computed for grids"):
        tfl.to_tflite(q)
    tfl.snap_hard_swish(q)
    assert "HARD_SWISH" in _run(tfl.to_tflite(q), CODES, "xnnpack")[3]


def test_training_snap_also_snaps_hard_swish():
    """``tfq.train.snap_biases_for_export`` (what ``tfq train`` and the benchmarks call after
    fine-tuning) snaps hard-swish layers onto TFLite's kernel too, and says how many codes moved."""
    q, _ = _hard_swish_model(0.0259, -114)
    snap = tfq.train.snap_biases_for_export(q)
    assert snap["hard_swish_layers"] == 1 and snap["hard_swish_codes_moved"] == 2 and snap["changed"]
    assert isinstance(q.get_layer("quant_act").layer.activation, tfl.TFLiteHardSwish)
