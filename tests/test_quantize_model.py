"""quantize_model / LSQScheme on whole models: layer coverage, placement, errors, save/load."""
import numpy as np
import pytest
import tf_keras as keras

import tfq
from tfq.configs import LayerQuantizeConfig


def coverage_model(dropout=0.2):
    """Every layer type the foundation issue lists, in one Functional graph."""
    inp = keras.Input((16, 16, 3))
    x = keras.layers.Rescaling(2.0, offset=-1.0)(inp)
    x = keras.layers.ZeroPadding2D(1, name="pad")(x)
    x = keras.layers.Conv2D(8, 3, use_bias=False, name="stem")(x)
    x = keras.layers.BatchNormalization(name="stem_bn")(x)
    x = keras.layers.ReLU(6.0, name="stem_relu")(x)
    x = keras.layers.SeparableConv2D(8, 3, padding="same", activation="relu", name="sep")(x)
    y = keras.layers.DepthwiseConv2D(3, padding="same", depth_multiplier=1, name="dw")(x)
    y = keras.layers.BatchNormalization(name="dw_bn")(y)
    y = keras.layers.Activation("swish")(y)
    se = keras.layers.GlobalAveragePooling2D(keepdims=True)(y)
    se = keras.layers.Conv2D(8, 1, activation="sigmoid")(se)
    y = keras.layers.Multiply()([y, se])
    x = keras.layers.Add()([x, y])
    z = keras.layers.AveragePooling2D()(x)
    w = keras.layers.MaxPooling2D(name="maxpool")(x)
    x = keras.layers.Concatenate()([z, w])
    x = keras.layers.Conv2D(8, 1, activation="relu")(x)
    x = x * 0.5 + 1.0  # TFOpLambda arithmetic, as keras.applications models hold
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    x = keras.layers.Reshape((-1,), name="reshape")(x)
    out = keras.layers.Dense(5, name="logits")(x)
    return keras.Model(inp, out)


def quantizers_of(q):
    out = {}
    for layer in q.layers:
        cfg = getattr(layer, "quantize_config", None)
        if isinstance(cfg, LayerQuantizeConfig):
            out[layer.layer.name] = cfg
    return out


def test_layer_coverage_and_placement():
    model = coverage_model()
    q = tfq.quantize_model(model, "lsq+", weight_bits=3, activation_bits=2, activation_config=3)
    x = np.random.default_rng(0).random((4, 16, 16, 3), np.float32)
    q(x, training=True)  # calibrates
    y = q(x).numpy()
    assert y.shape == (4, 5) and np.all(np.isfinite(y))
    cfgs = quantizers_of(q)
    # first and last weighted layers at 8 bits, the others at weight_bits
    assert cfgs["stem"].weight_quantizers["kernel"].bits == 8
    assert cfgs["logits"].weight_quantizers["kernel"].bits == 8
    assert cfgs["sep_depthwise"].weight_quantizers["depthwise_kernel"].bits == 3
    assert cfgs["dw"].weight_quantizers["depthwise_kernel"].per_axis == (2, 3)
    # Conv -> BN -> ReLU6 fuses: conv and BN outputs are not held, ReLU output is
    assert cfgs["stem"].output_quantizer is None
    assert "stem_bn" not in cfgs
    relu_q = cfgs["stem_relu"].output_quantizer
    assert relu_q.bits == 2 and relu_q.signed and relu_q.learn_offset  # config 3 feeds a conv
    # swish input (BN output) is held at 8 bits, intermediate
    assert cfgs["dw_bn"].output_quantizer.bits == 8
    # the activation split out of the separable conv feeds the depthwise conv and the Add
    assert cfgs["sep_activation"].output_quantizer.bits == 8
    # the input is quantized at 8 bits by a tfmot QuantizeLayer
    assert any(type(l).__name__ == "QuantizeLayer" for l in q.layers)
    # value-preserving layers hold no quantizer
    for name in ("flatten", "dropout", "reshape", "maxpool", "pad"):
        assert name not in cfgs
    # the logits are held at 8 bits
    assert cfgs["logits"].output_quantizer.bits == 8


def test_sequential_and_activation_argument_are_split_exactly():
    keras.utils.set_random_seed(0)  # the 8-bit MSE-initialised grids clip differently per random init
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu", name="hidden"),
                              keras.layers.Dense(3, activation="softmax", name="probs")])
    q = tfq.quantize_model(model, "lsq", weight_bits=8, activation_bits=8)
    names = [l.name for l in q.layers]
    assert "quant_hidden_activation" in names and "quant_probs_activation" in names
    x = np.random.default_rng(1).random((16, 8), np.float32)
    q(x, training=True)
    np.testing.assert_allclose(q(x).numpy(), model(x).numpy(), atol=0.02)


def test_unsupported_layers_are_all_named():
    inp = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(2, 3)(inp)
    x = keras.layers.LSTM(3)(keras.layers.Reshape((6, 12))(x))
    x = keras.layers.LayerNormalization()(x)
    out = keras.layers.Dense(2)(x)
    with pytest.raises(ValueError) as err:
        tfq.quantize_model(keras.Model(inp, out), "lsq+")
    assert "lstm (LSTM)" in str(err.value) and "layer_normalization (LayerNormalization)" in str(err.value)


def test_subclassed_and_nested_models_are_rejected():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="subclassed model"):
        tfq.quantize_model(net, "lsq+")
    inner = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    inp = keras.Input((3,))
    outer = keras.Model(inp, keras.layers.Dense(2)(inner(inp)))
    with pytest.raises(ValueError, match="nested models"):
        tfq.quantize_model(outer, "lsq+")


def test_keras3_model_is_rejected_clearly():
    class FakeKeras3Model:
        pass

    FakeKeras3Model.__module__ = "keras.src.models.functional"
    with pytest.raises(TypeError, match="Keras 3 model"):
        tfq.quantize_model(FakeKeras3Model(), "lsq+")


@pytest.mark.parametrize("fmt", ["h5", "savedmodel"])
def test_save_load_round_trip(tmp_path, fmt):
    model = coverage_model()
    q = tfq.quantize_model(model, "lsq+", weight_bits=4, activation_bits=4, activation_config=4)
    x = np.random.default_rng(3).random((4, 16, 16, 3), np.float32)
    q.compile(optimizer="adam", loss=keras.losses.MeanSquaredError())
    q.fit(x, np.zeros((4, 5), np.float32), epochs=1, verbose=0)
    path = str(tmp_path / ("m.h5" if fmt == "h5" else "m_savedmodel"))
    q.save(path)
    with tfq.quantize_scope():
        loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded(x).numpy(), q(x).numpy())
    state = {w.name: w.numpy() for w in q.weights if "_scale" in w.name or "_offset" in w.name}
    loaded_state = {w.name: w.numpy() for w in loaded.weights if w.name in state}
    assert state.keys() == loaded_state.keys() and len(state) > 5
    for name, value in state.items():
        np.testing.assert_array_equal(loaded_state[name], value)
    # loaded quantizers are calibrated: a training call must not re-initialise them
    loaded(x * 10, training=True)
    for w in loaded.weights:
        if w.name in state and "output_scale" in w.name:
            np.testing.assert_array_equal(w.numpy(), state[w.name])


def test_calibrate_touches_only_quantizers():
    model = coverage_model()
    q = tfq.quantize_model(model, "lsq+")
    x = np.random.default_rng(4).random((8, 16, 16, 3), np.float32)
    bn = [w for w in q.weights if "moving_mean" in w.name][0]
    before = bn.numpy().copy()
    tfq.calibrate(q, x)
    np.testing.assert_array_equal(bn.numpy(), before)
    flags = [w for w in q.weights if w.name.endswith("_initialized:0")]
    assert flags and all(bool(f.numpy()) for f in flags)


def _traced_conds(q, x):
    """Conditional ops in the graph of a training-mode forward traced now."""
    import tensorflow as tf
    graph = tf.function(lambda t: q(t, training=True)).get_concrete_function(tf.TensorSpec(x.shape)).graph
    return [op.name for op in graph.get_operations() if op.type in ("If", "StatelessIf")]


@pytest.mark.parametrize("method", ["lsq+", "n2uq", "ddq"])
def test_a_step_traced_after_calibration_leaves_the_initialisation_out(method):
    """Tracing every quantizer's first-call initialisation branch dominates the time to trace a
    training step; once calibrated, a newly traced step holds no such branch, and from the same
    state it computes exactly what a step traced with the branches computes. (The values that
    eager calibration and an in-graph first step initialise may differ in the last bits, as
    eager and graph reductions do, and that spreads downstream.)"""
    import tensorflow as tf
    x = np.random.default_rng(4).random((8, 16, 16, 3), np.float32)
    keras.utils.set_random_seed(0)
    in_graph = tfq.quantize_model(coverage_model(dropout=0.0), method)  # a deterministic training forward
    keras.utils.set_random_seed(0)
    eager = tfq.quantize_model(coverage_model(dropout=0.0), method)
    eager.set_weights(in_graph.get_weights())
    assert _traced_conds(in_graph, x)  # the branches are there before calibration
    first_step = tf.function(lambda t: in_graph(t, training=True))
    first_step(x)  # traced with the branches; initialises inside the graph
    tfq.calibrate(eager, x)  # initialises eagerly
    assert _traced_conds(eager, x) == []
    in_graph.set_weights(eager.get_weights())  # same state; first_step still holds its init branches
    without_branches = tf.function(lambda t: eager(t, training=True))
    np.testing.assert_array_equal(first_step(x), without_branches(x))


def test_a_step_traced_without_the_initialisation_refuses_to_run_after_a_reset():
    import tensorflow as tf
    q = tfq.quantize_model(coverage_model(), "lsq+")
    x = np.random.default_rng(4).random((8, 16, 16, 3), np.float32)
    tfq.calibrate(q, x)
    step = tf.function(lambda t: q(t, training=True))
    step(x)
    flag = next(w for w in q.weights if w.name.endswith("_initialized:0"))
    flag.assign(False)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"was reset to uninitialised after this step was traced"):
        step(x)


def test_a_layer_annotated_with_its_own_quantize_config_keeps_it():
    """tfmot's way to quantize a custom layer: quantize_annotate_layer(layer, config). tfq must
    accept the annotation (even for a layer type it does not support) and use that config."""
    import tensorflow_model_optimization as tfmot

    class KeepFloat(tfmot.quantization.keras.QuantizeConfig):
        def get_weights_and_quantizers(self, layer):
            return []

        def get_activations_and_quantizers(self, layer):
            return []

        def set_quantize_weights(self, layer, quantize_weights):
            pass

        def set_quantize_activations(self, layer, quantize_activations):
            pass

        def get_output_quantizers(self, layer):
            return []

        def get_config(self):
            return {}

    class Scale(keras.layers.Layer):  # a custom layer tfq knows nothing about
        def call(self, x):
            return 2.0 * x

    def build(annotate):
        inputs = keras.Input((8, 8, 1))
        x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
        scale = Scale(name="scale")
        x = (tfmot.quantization.keras.quantize_annotate_layer(scale, KeepFloat()) if annotate else scale)(x)
        outputs = keras.layers.Dense(3, name="dense")(keras.layers.Flatten()(x))
        return keras.Model(inputs, outputs)

    with pytest.raises(ValueError, match=r"scale \(Scale\)"):
        tfq.quantize_model(build(False))  # un-annotated: named as unsupported
    annotated = build(True)
    with tfmot.quantization.keras.quantize_scope({"KeepFloat": KeepFloat, "Scale": Scale}):
        q = tfq.quantize_model(annotated)
    wrapper = q.get_layer("quant_scale")
    assert isinstance(wrapper.quantize_config, KeepFloat)
    assert isinstance(q.get_layer("quant_conv").quantize_config, LayerQuantizeConfig)
