"""Bad input: every error names the argument or layer concerned and what is allowed instead."""
import platform
import re
import sys
import types

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq import _keras as tfq_keras
from tfq import graph, schemes
from tfq.export import bench
from tfq.quantizers.grid import UncalibratedError

SHAPE = (8, 8, 1)


def tiny(name="tiny"):
    """conv1 -> relu -> conv2 -> relu -> flatten -> logits (conv2 is the only middle layer)."""
    keras.utils.set_random_seed(0)
    inp = keras.Input(SHAPE, name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inp, keras.layers.Dense(3, name="logits")(x), name=name)


def images(n=4, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *SHAPE)).astype(np.float32)


# --- bit-widths, methods, options -------------------------------------------------------------
@pytest.mark.parametrize("method, option, value, allowed", [
    ("lsq+", "weight_bits", 9, r"\[2, 8\]"),
    ("lsq+", "weight_bits", 1, r"\[2, 8\]"),
    ("lsq+", "activation_bits", 0, r"\[2, 8\]"),
    ("lsq+", "weight_bits", 4.0, r"\[2, 8\]"),  # whole numbers only
    ("lsq+", "first_last_bits", 16, r"\[2, 8\]"),
    ("lsq", "weight_bits", 9, r"\[2, 8\]"),
    ("n2uq", "weight_bits", 8, r"\[2, 7\]"),  # odd-code grid: bits + 1 <= 8
    ("n2uq", "activation_bits", 1, r"\[2, 8\]"),
    ("ddq", "target_bits", 9, r"\[2, 8\]"),
    ("ddq", "max_bits", 1, r"\[2, 8\]"),
    ("adaqat", "init_weight_bits", 1, r"\[2, 8\]"),
    ("adaqat", "init_activation_bits", 9, r"\[2, 8\]"),
])
def test_bit_widths_outside_the_supported_range(method, option, value, allowed):
    with pytest.raises(ValueError, match=rf"{option} must be an integer in {allowed}, got {value!r}"):
        tfq.quantize_model(tiny(), method, **{option: value})


def test_unknown_method_lists_the_available_ones():
    with pytest.raises(ValueError,
                       match=r"Unknown method 'lsqq'; available: \['adaqat', 'ddq', 'lsq', 'lsq\+', 'n2uq'\]"):
        tfq.quantize_model(tiny(), "lsqq")


@pytest.mark.parametrize("method, option, value, allowed", [
    ("lsq+", "activation_config", 5, r"\[1, 2, 3, 4\]"),
    ("lsq+", "init", "he", r"\['lsq', 'lsq\+', 'minmax'\]"),
    ("n2uq", "init", "he", r"\['data', 'paper'\]"),
    ("n2uq", "input_init", "he", r"\['lsq', 'lsq\+', 'minmax'\]"),
    ("ddq", "mode", "auto", r"\['fixed', 'mixed'\]"),
    ("adaqat", "rescale", "sat", r"\['constant', 'none', 'stddev'\]"),
])
def test_unknown_configuration_or_initialisation(method, option, value, allowed):
    with pytest.raises(ValueError, match=rf"{option} must be one of {allowed}"):
        tfq.quantize_model(tiny(), method, **{option: value})


@pytest.mark.parametrize("method", ["lsq+", "lsq", "n2uq", "ddq", "adaqat"])
def test_unknown_option_lists_the_methods_options(method):
    with pytest.raises(TypeError,
                       match=rf"method '{re.escape(method)}' has no option\(s\) bitz; its options: .*first_last_bits"):
        tfq.quantize_model(tiny(), method, bitz=4)


def test_method_options_are_exactly_what_the_builders_accept():
    # every listed option is accepted (no ValueError/TypeError about the name itself) ...
    assert set(schemes.method_options("lsq")) == set(schemes.method_options("lsq+"))
    assert {"init_weight_bits", "weight_bits", "rescale"} <= set(schemes.method_options("adaqat"))
    assert "method" not in schemes.method_options("lsq")
    # ... and a scheme instance takes no options at all
    with pytest.raises(ValueError, match=r"options \['weight_bits'\] cannot be applied to a scheme instance"):
        schemes.get(schemes.LSQScheme(), weight_bits=4)


# --- models tfq cannot quantize ---------------------------------------------------------------
def test_unsupported_layers_are_all_listed_in_one_error():
    inp = keras.Input(SHAPE)
    x = keras.layers.Conv2D(4, 3, name="conv")(inp)
    x = keras.layers.LayerNormalization(name="norm")(x)
    x = keras.layers.Conv2DTranspose(2, 3, name="deconv")(x)
    out = keras.layers.Dense(3, name="logits")(keras.layers.Flatten()(x))
    with pytest.raises(ValueError) as err:
        tfq.quantize_model(keras.Model(inp, out, name="odd"))
    message = str(err.value)
    assert "norm (LayerNormalization), deconv (Conv2DTranspose)" in message
    assert "Supported layer types: " in message and "Conv2D, " in message and "DepthwiseConv2D" in message
    assert "quantize_annotate_layer" in message  # how to quantize a custom layer anyway


def test_subclassed_model_explains_what_is_supported():
    class Classifier(keras.Model):
        def __init__(self):
            super().__init__(name="classifier")
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Classifier()
    model(np.zeros((1, 4), np.float32))
    with pytest.raises(graph.UnsupportedModelError,
                       match=r"'classifier' \(Classifier\) is a subclassed model; tfq quantizes Sequential and "
                             r"Functional models"):
        tfq.quantize_model(model)


def test_nested_and_shared_layers_are_named():
    inner = tiny("backbone")
    inp = keras.Input(SHAPE)
    with pytest.raises(graph.UnsupportedModelError, match=r"nested models \['backbone'\] \(flatten them"):
        tfq.quantize_model(keras.Model(inp, inner(inp), name="outer"))
    shared = keras.layers.Dense(4, name="shared")
    inp = keras.Input((4,))
    with pytest.raises(graph.UnsupportedModelError, match=r"layers called more than once \['shared'\]"):
        tfq.quantize_model(keras.Model(inp, shared(shared(inp))))


def test_unbuilt_sequential_model():
    with pytest.raises(ValueError, match=r"model must be built \(call model.build\(input_shape\) first\)"):
        tfq.quantize_model(keras.Sequential([keras.layers.Dense(3)]))


def test_keras3_model_is_detected():
    keras3 = pytest.importorskip("keras")
    if not keras3.__version__.startswith("3"):
        pytest.skip("the keras package is not Keras 3")
    inp = keras3.Input((4,))
    model = keras3.Model(inp, keras3.layers.Dense(2)(inp))
    for call in (lambda: tfq.quantize_model(model), lambda: tfq.ptq.pwlq(model, np.zeros((2, 4), np.float32))):
        with pytest.raises(TypeError, match=r"model is a Keras 3 model \(keras\.src\..*\); tfq works on Keras 2 "
                                            r"models built with `tf_keras`"):
            call()


def test_keras3_detection_by_class_module():
    fake = type("Functional", (), {"__module__": "keras.src.models.functional"})()
    with pytest.raises(TypeError, match=r"network is a Keras 3 model \(keras\.src\.models\.functional\.Functional\)"):
        tfq_keras.check_keras2_model(fake, "network")
    with pytest.raises(TypeError, match=r"model must be a tf_keras.Model, got dict"):
        tfq.quantize_model({})


# --- non-finite and empty data ----------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights_name_the_layer(bad):
    model = tiny()
    kernel = model.get_layer("conv2").kernel
    value = kernel.numpy()
    value[0, 0, 0, 0] = bad
    kernel.assign(value)
    with pytest.raises(ValueError, match=r"NaN or Inf weights in layer\(s\) conv2 \(kernel\); tfq quantizes "
                                         r"weights whose values are all finite"):
        tfq.quantize_model(model)
    with pytest.raises(ValueError, match=r"NaN or Inf values: conv2/kernel"):
        tfq.ptq.pwlq(model, images())


@pytest.fixture(scope="module")
def quantized():
    return tfq.quantize_model(tiny())


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_non_finite_calibration_batches(quantized, bad):
    x = images()
    x[1, 2, 3, 0] = bad
    with pytest.raises(ValueError, match=r"calibrate: data batch 0 contains NaN or Inf values \(1 of 256\)"):
        tfq.calibrate(quantized, x)
    dataset = tf.data.Dataset.from_tensor_slices((np.concatenate([images(), x]), np.zeros(8))).batch(4)
    with pytest.raises(ValueError, match=r"calibrate: data batch 1 contains NaN or Inf"):
        tfq.calibrate(quantized, dataset, steps=2)
    with pytest.raises(ValueError, match=r"calibration_data batch 0 contains NaN or Inf values"):
        tfq.ptq.pwlq(tiny(), x)
    # nothing was initialised from the bad batches
    assert not any(w.numpy() for w in quantized.weights if w.name.endswith("_initialized:0"))


def test_empty_calibration_data(quantized):
    empty = np.zeros((0, *SHAPE), np.float32)
    with pytest.raises(ValueError, match=r"calibrate: data batch 0 is empty \(shape \(0, 8, 8, 1\)\)"):
        tfq.calibrate(quantized, empty)
    with pytest.raises(ValueError, match=r"calibrate: data is empty; give at least one batch"):
        tfq.calibrate(quantized, tf.data.Dataset.from_tensor_slices(empty).batch(2))
    with pytest.raises(ValueError, match=r"calibrate: steps must be a positive integer .*got 0"):
        tfq.calibrate(quantized, images(), steps=0)
    for data in (empty, [], tf.data.Dataset.from_tensor_slices(empty).batch(2)):
        with pytest.raises(ValueError, match=r"calibration_data is empty"):
            tfq.ptq.pwlq(tiny(), data)


def test_calibrate_accepts_input_only_datasets():
    q = tfq.quantize_model(tiny())
    tfq.calibrate(q, tf.data.Dataset.from_tensor_slices(images(8)).batch(4), steps=1)
    flags = [w for w in q.weights if w.name.endswith("_initialized:0")]
    assert flags and all(bool(w.numpy()) for w in flags)


def test_training_data_limit_must_leave_examples():
    with pytest.raises(ValueError, match=r"limit=0 leaves no 'train' examples of 'digits': a dataset needs limit >= 1"):
        tfq.data.load("digits", "train", limit=0)
    with pytest.raises(ValueError, match=r"limit must be None or a non-negative integer, got -1"):
        tfq.data.load("digits", "train", limit=-1)
    with pytest.raises(ValueError, match=r"name='mnist2' is not supported; allowed values: 'fashion_mnist', 'digits'"):
        tfq.data.load("mnist2")


# --- export -----------------------------------------------------------------------------------
def test_export_before_the_quantizers_are_initialised_names_the_layer(quantized):
    with pytest.raises(UncalibratedError, match=r"of layer '\w+' has not seen any data: train the model or run "
                                                r"tfq.calibrate\(model, data\) before exporting"):
        tfq.export.to_tflite(quantized)


CONVERTER_MESSAGE = (
    'loc(fused["Conv2D:", "tiny/quant_conv2/Conv2D@__inference__wrapped_model_123"]): error: '
    "'tfl.conv_2d' op quantization parameters violate the same scale constraint")


class _FailingConverter:
    """Stands in for the TFLite converter: conversion fails with a message in the MLIR converter's
    format, which locates the failing op by ``<model>/<layer>/<op>``."""

    def __init__(self, *args, **kwargs):
        self.optimizations = []

    def convert(self):
        raise RuntimeError(CONVERTER_MESSAGE)


@pytest.fixture
def failing_converter(monkeypatch):
    fake = types.SimpleNamespace(from_keras_model=lambda model: _FailingConverter())
    monkeypatch.setattr(tf.lite, "TFLiteConverter", fake)


@pytest.fixture(scope="module")
def calibrated():
    q = tfq.quantize_model(tiny())
    return tfq.calibrate(q, images())


def test_tflite_conversion_failure_keeps_the_converters_message(calibrated, failing_converter):
    with pytest.raises(tfq.export.ExportError, match=r"TFLite conversion of 'tiny' failed at layer 'conv2': .*same scale constraint"):
        tfq.export.to_tflite(calibrated)


def test_tflite_conversion_failure_names_the_layer(calibrated, failing_converter):
    with pytest.raises(tfq.export.ExportError, match=r"layer 'conv2'"):
        tfq.export.to_tflite(calibrated)


class _NotConvertible(keras.layers.Layer):
    """An op TFLite's builtin set lacks (DenseBincount): the real converter fails on it."""

    def call(self, x):
        counts = tf.math.bincount(tf.cast(tf.reshape(x, [-1]), tf.int32), minlength=4, maxlength=4)
        return tf.cast(counts, tf.float32)[None] + tf.reduce_sum(x)


def test_a_real_conversion_failure_names_the_layer(calibrated, monkeypatch):
    """The MLIR converter's message text often holds only the error; the op's location
    (``tiny/quant_conv2/bincount/DenseBincount@...``) comes in ``ConverterError.errors``."""
    from tfq.export import tflite as tfl
    inputs = keras.Input(SHAPE)
    broken = keras.Model(inputs, _NotConvertible(name="quant_conv2")(inputs), name="tiny")
    monkeypatch.setattr(tfl, "build_inference_model", lambda *args, **kwargs: (broken, None))
    with pytest.raises(tfq.export.ExportError, match=r"TFLite conversion of 'tiny' failed at layer 'conv2': "
                                                     r"(?s:.*)DenseBincount"):
        tfq.export.to_tflite(calibrated, int8_io=False)   # float io: the stand-in graph is float


# --- benchmark targets without their tools ----------------------------------------------------
@pytest.fixture
def tflite_file(tmp_path):
    path = tmp_path / "model.tflite"
    path.write_bytes(b"\x1c\x00\x00\x00TFL3" + bytes(24))  # only the identifier is checked up front
    return path


def test_android_without_adb(tflite_file, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(bench.BenchmarkError, match=r"adb not found on PATH: install Android platform-tools .* or "
                                                   r"pass adb=/path/to/adb"):
        tfq.export.benchmark(tflite_file, target="android")


def test_android_without_benchmark_binary(tflite_file, tmp_path, monkeypatch):
    adb = tmp_path / "bin" / "adb"
    adb.parent.mkdir()
    adb.write_text(f"#!{sys.executable}\nimport sys; sys.exit(1)\n")
    adb.chmod(0o755)
    monkeypatch.setenv("PATH", str(adb.parent))
    monkeypatch.delenv(bench.BINARY_ENV, raising=False)
    with pytest.raises(bench.BenchmarkError, match=rf"no benchmark_model binary: pass benchmark_binary=PATH "
                                                   rf"\(CLI --benchmark_binary\) or set {bench.BINARY_ENV}"):
        tfq.export.benchmark(tflite_file, target="android")
    with pytest.raises(bench.BenchmarkError, match=r"benchmark_model binary '/nowhere/benchmark_model' does not exist"):
        tfq.export.benchmark(tflite_file, target="android", benchmark_binary="/nowhere/benchmark_model")


@pytest.mark.skipif(platform.machine().lower() in ("aarch64", "arm64"), reason="runs natively on aarch64")
def test_aarch64_target_on_another_machine(tflite_file, tmp_path):
    with pytest.raises(bench.BenchmarkError, match=r"target='aarch64' on a \w+ machine: run this on the aarch64 "
                                                   r"board .* or pass emulate=True"):
        tfq.export.benchmark(tflite_file, target="aarch64")
    with pytest.raises(bench.BenchmarkError, match=r"emulated aarch64 run impossible: .*no arm64 Python at "):
        tfq.export.benchmark(tflite_file, target="aarch64", emulate=True, sysroot=str(tmp_path / "no-sysroot"))


def test_unknown_benchmark_target(tflite_file):
    with pytest.raises(ValueError, match=r"target must be one of \('host', 'aarch64', 'android'\), got 'ios'"):
        tfq.export.benchmark(tflite_file, target="ios")
