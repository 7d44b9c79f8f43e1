"""tfq.train.finetune_on_bias_grid / tfq.callbacks.BiasGridProjection (export issue 3): a short
fine-tuning phase with BatchNorm in inference mode whose folded biases stay on the int32 grid.

A tiny Conv-BN-ReLU / DepthwiseConv-BN-ReLU / Dense model on the 8x8 digits set, LSQ+ W2A2, so
the accumulator step ``s_in * s_w'`` is coarse and a freshly trained model is visibly off-grid.
"""
import numpy as np
import pytest
import tf_keras as keras

import tfq
from tfq import data, graph, train
from tfq.callbacks import bias_grid
from tfq.export import tflite as tfl
from tfq.export import verify

L = keras.layers
PAIRS = (("quant_conv", "conv_bn"), ("quant_dw", "dw_bn"), ("quant_logits", None))


def _bn(q, name):
    return tfq.costs.inner_layer(q.get_layer(name))


def _tiny_model():
    x = inp = keras.Input((8, 8, 1))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv")(x)
    x = L.BatchNormalization(name="conv_bn")(x)
    x = L.ReLU(name="conv_relu")(x)
    x = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(x)
    x = L.BatchNormalization(name="dw_bn")(x)
    x = L.ReLU(name="dw_relu")(x)
    x = L.GlobalAveragePooling2D(name="gap")(x)
    return keras.Model(inp, L.Dense(10, name="logits")(x))


@pytest.fixture(scope="module")
def trained():
    """(weights after 2 epochs of LSQ+ W2A2 QAT, unsnapped) and the model."""
    keras.utils.set_random_seed(0)
    q = tfq.quantize_model(_tiny_model(), "lsq+", weight_bits=2, activation_bits=2, activation_config=3,
                           first_last_bits=2)
    train.finetune(q, "digits", 2, batch_size=64, learning_rate=3e-3, verbose=0)
    return q, q.get_weights()


def _fresh(trained):
    q, weights = trained
    q.set_weights(weights)
    return q


def _grid_offsets(q, steps=None):
    """Per weighted layer: folded bias / accumulator step minus its nearest integer (in steps),
    the accumulator step computed here from the quantizer grids and BatchNorm variables; ``steps``
    (a dict) receives each layer's accumulator step in units of its BatchNorm beta (or bias)."""
    view = graph.GraphView(q)
    offsets = {}
    for name, bn_name in PAIRS:
        wrapper = q.get_layer(name)
        quantizer, qvars = tfq.costs.weight_quantizers(wrapper)[0][1:]
        s_w = np.asarray(quantizer.integer_grid(qvars).scale, np.float64).reshape(-1)
        inner = wrapper.layer
        # the export fills the int8 range with each output channel's codes times k
        kernel = tfq.costs.weight_quantizers(wrapper)[0][0]  # the variable (not the layer's attribute)
        w_q = np.asarray(quantizer(kernel, training=False, weights=qvars), np.float64)
        if type(inner).__name__ == "DepthwiseConv2D":  # output channel = input channel x multiplier
            w_q = w_q.reshape(w_q.shape[0], w_q.shape[1], 1, -1)
        codes = np.abs(np.round(w_q / s_w)).reshape(-1, w_q.shape[-1])
        peak = np.max(codes, axis=0) if s_w.size > 1 else np.full(codes.shape[-1], np.max(codes))
        # 2-bit codes: k is the largest multiple of INT4's floor(7 / max|code|) with k * max|code| <= 127
        peak = np.maximum(peak, 1)
        k4 = np.floor(7 / peak)
        k = k4 * np.floor(127 / (peak * k4))
        s_w = s_w / k
        bias = inner.bias.numpy().astype(np.float64) if inner.use_bias else 0.0
        if bn_name is not None:
            bn = _bn(q, bn_name)
            a = bn.gamma.numpy() / np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
            bias = a * (bias - bn.moving_mean.numpy()) + bn.beta.numpy()
            s_w = s_w * np.abs(a)
        s_in = tfl.input_step(view, name)
        ratio = bias / (s_in * s_w)
        offsets[name] = ratio - np.round(ratio)
        if steps is not None:
            steps[name] = s_in * s_w
        # the export's own fold agrees with the hand computation
        folded = tfl.export_weights(wrapper, q.get_layer(bn_name) if bn_name else None, s_in)[0]
        np.testing.assert_allclose(folded.bias, bias, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(folded.step, np.broadcast_to(s_w, folded.step.shape), rtol=1e-5)
    return offsets


def _moving_statistics(q):
    return [v.numpy().copy() for layer in bias_grid.batch_norm_layers(q)
            for v in (layer.moving_mean, layer.moving_variance)]


def test_phase_ends_on_the_int32_grid_with_statistics_and_flags_kept(trained):
    q = _fresh(trained)
    before = _grid_offsets(q)
    assert max(np.max(np.abs(o)) for o in before.values()) > 0.1  # trained biases are off the grid
    stats = _moving_statistics(q)
    _bn(q, "dw_bn").trainable = False  # a user's own flag must come back as it was
    beta = _bn(q, "conv_bn").beta.numpy().copy()
    gamma = _bn(q, "conv_bn").gamma.numpy().copy()
    out = train.finetune_on_bias_grid(q, "digits", 6, learning_rate=1e-2, batch_size=64)
    assert out["steps"] == 6
    for name, offset in _grid_offsets(q).items():
        assert np.max(np.abs(offset)) < 1e-2, name
    for old, new in zip(stats, _moving_statistics(q)):
        np.testing.assert_array_equal(old, new)
    assert _bn(q, "conv_bn").trainable is True
    assert _bn(q, "dw_bn").trainable is False
    _bn(q, "dw_bn").trainable = True
    # the QuantizeWrapperV2 keeps gamma and beta trainable while the BatchNorm runs in inference mode
    assert not np.allclose(gamma, _bn(q, "conv_bn").gamma.numpy())
    assert not np.allclose(beta, _bn(q, "conv_bn").beta.numpy())


def test_every_batch_is_trained_on_the_grid(trained):
    """After each train batch (not only at the end) the biases are on the grid."""
    q = _fresh(trained)
    seen = []

    class Check(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(max(np.max(np.abs(o)) for o in _grid_offsets(self.model).values()))

    projection = bias_grid.BiasGridProjection()
    with bias_grid.frozen_batch_norm(q):
        train.compile_model(q, 1e-2)
        x, y = data.load_numpy("digits", limit=192)
        q.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[projection, Check()])
    assert len(seen) == 3 and max(seen) < 1e-2
    assert len(projection.history) == 4  # the snap at train begin plus one per batch


def test_bias_updates(trained):
    """frozen: biases stay at their start value projected onto the (moving) grid; projected and
    straight_through both move them, straight_through by accumulated float updates."""
    results = {}
    for mode in bias_grid.BIAS_UPDATES:
        q = _fresh(trained)
        start = _bn(q, "conv_bn").beta.numpy().copy()
        train.finetune_on_bias_grid(q, "digits", 4, learning_rate=1e-2, batch_size=64, bias_update=mode)
        results[mode] = _bn(q, "conv_bn").beta.numpy()
        steps = {}
        assert np.max(np.abs(_grid_offsets(q, steps)["quant_conv"])) < 1e-2
        if mode == "frozen":
            # only the projection moved it: within half a (final) accumulator step of its start
            assert np.all(np.abs(results[mode] - start) <= 0.5 * steps["quant_conv"] * (1 + 1e-4) + 1e-6)
    for mode in ("straight_through", "projected"):
        assert not np.allclose(results[mode], results["frozen"]), mode


def test_tflite_export_matches_keras_after_the_phase(trained):
    q = _fresh(trained)
    train.finetune_on_bias_grid(q, "digits", 3, learning_rate=1e-2, batch_size=64)
    x, _ = data.load_numpy("digits", "test", limit=64)
    flat = tfl.to_tflite(q)
    outputs, interp = verify.run_tflite(flat, x)
    detail = interp.get_output_details()[0]
    keras_steps = verify.output_steps(q.predict(x, verbose=0), detail)
    assert np.max(np.abs(keras_steps - verify.tflite_steps(outputs, detail))) <= 1.0 + 1e-3


@pytest.mark.parametrize("steps", [0, -3, 2.5, True, "10", None])
def test_bad_steps_raise(trained, steps):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        train.finetune_on_bias_grid(trained[0], "digits", steps)


def test_bad_arguments_raise(trained):
    with pytest.raises(ValueError, match="bias_update must be one of straight_through, projected, frozen"):
        bias_grid.BiasGridProjection("round")
    with pytest.raises(ValueError, match="dataset must be a dataset name or a tf.data.Dataset"):
        train.finetune_on_bias_grid(trained[0], [1, 2], 2)
    q = _fresh(trained)
    train.compile_model(q, 1e-3)
    x, y = data.load_numpy("digits", limit=64)
    with pytest.raises(ValueError, match="needs every BatchNormalization in inference mode"):
        q.fit(x, y, epochs=1, verbose=0, callbacks=[bias_grid.BiasGridProjection()])


@pytest.mark.slow  # trains a float model first (~30 s of CPU)
def test_run_records_the_phase(tmp_path):
    """train.run(bias_grid_steps=N) runs the phase after fine-tuning and records both accuracies;
    the saved model's biases are on the grid (a second snap moves nothing)."""
    assert tfq.callbacks.BiasGridProjection is bias_grid.BiasGridProjection
    with pytest.raises(ValueError, match="bias_grid_steps must be an integer >= 0"):
        train.run(str(tmp_path / "bad"), bias_grid_steps=-1)
    metrics = train.run(str(tmp_path / "run"), dataset="digits", model="small_cnn", method="lsq+", weight_bits=2,
                        activation_bits=2, float_epochs=1, epochs=1, batch_size=64, limit=256, verbose=0,
                        bias_grid_steps=3)
    record = metrics["bias_grid"]
    assert record["steps"] == 3 and record["bias_update"] == "straight_through"
    assert record["accuracy_after_phase"] == metrics["quantized_accuracy"]
    assert 0 <= record["accuracy_after_snap_without_phase"] <= 1
    with tfq.quantize_scope():
        saved = keras.models.load_model(str(tmp_path / "run" / "quantized.h5"), compile=False)
    rows = tfl.snap_biases(saved)
    assert max(r.get("max_accumulator_steps", 0.0) for r in rows) < 1e-2
