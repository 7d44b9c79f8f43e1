"""The main job end to end on a small slice of real Fashion-MNIST (CLI, run directory)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tf_keras as keras

import tfq
from tfq import data, train

needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(data.data_dir(), "t10k-labels-idx1-ubyte.gz")),
    reason="Fashion-MNIST IDX files not installed (apt-get install dataset-fashion-mnist)")


@needs_fashion
def test_tfq_train_writes_a_loadable_run_directory(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "tfq.cli", "train", "--model=small_cnn", "--method=lsq+",
           "--weight_bits=4", "--activation_bits=4", "--limit=1024", "--float_epochs=2", "--epochs=1",
           f"--run_dir={run_dir}", "--batch_size=64"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "lsq+ W4A4 accuracy" in out.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["weight_bits"] == 4 and len(metrics["epoch_seconds"]) == 1
    assert 0.0 <= metrics["quantized_accuracy"] <= 1.0
    assert any(name.endswith("_offset:0") for name in metrics["quantizers"])  # config 4 by default
    # BatchNorm statistics are re-estimated by default (small_cnn has BatchNorm layers)
    reestimation = metrics["batch_norm_reestimation"]
    assert reestimation["examples"] == tfq.train.BN_REESTIMATE_EXAMPLES and reestimation["layers"] > 0
    assert 0.0 <= reestimation["accuracy_before"] <= 1.0
    assert list((run_dir / "logs").rglob("events.out.tfevents*"))
    with tfq.quantize_scope():
        q = keras.models.load_model(run_dir / "quantized.h5", compile=False)
    assert q.output_shape == (None, 10)


def test_cli_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "tfq.cli", "fly"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "COMMAND is one of train" in (out.stdout + out.stderr)


def test_cli_and_run_share_the_batch_norm_reestimation_default():
    from tfq import cli
    assert cli.FLAGS["bn_reestimate_examples"].default == tfq.train.BN_REESTIMATE_EXAMPLES > 0


def test_cli_prints_export_errors_without_a_traceback(monkeypatch, capsys):
    """An ExportError (it names the layer and the ways out) is the CLI's message and exit code 1."""
    from tfq import cli
    from tfq.export import runs, tflite

    def refuse(*args, **kwargs):
        raise tflite.ExportError("quant_conv: its PWLQ kernel is a sum of 2 integer parts")

    monkeypatch.setattr(runs, "export_run", refuse)
    cli.FLAGS(["tfq"])  # default flag values, as app.run would parse them
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["tfq", "export", "some_run_dir"])
    finally:
        cli.FLAGS.unparse_flags()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.strip() == "tfq export: error: quant_conv: its PWLQ kernel is a sum of 2 integer parts"


@pytest.mark.parametrize("method, callback", [("adaqat", "AdaQAT"), ("ddq", "DDQGateSchedule")])
def test_run_attaches_the_method_callback(tmp_path, method, callback):
    """train.run trains AdaQAT with its bit-width callback and mixed DDQ with its gate schedule,
    and records the per-layer bits the run ended with; the bias snap leaves Keras = export."""
    options = {"callback_options": {"lambda_": 0.5}} if method == "adaqat" else {}
    metrics = tfq.train.run(str(tmp_path / method), dataset="digits", model="small_cnn", method=method,
                            weight_bits=4, activation_bits=4, float_epochs=1, epochs=1, batch_size=64,
                            limit=256, verbose=0, **options)
    assert metrics["callbacks"] == [callback]
    rows = {r["layer"]: r for r in metrics["costs"]}
    assert rows["TOTAL"]["params"] > 0 and rows["TOTAL"]["bitops"] > 0
    if method == "adaqat":
        # 4 steps from N_w = 4 cannot freeze; the bits must be the callback's ceil(N) (<= the initial 4)
        middle = [r for name, r in rows.items() if name != "TOTAL" and r["weight_bits"] not in (8.0,)]
        assert middle and all(2 <= r["weight_bits"] <= 4 for r in middle)
    else:  # the schedule drives precision from max_bits (8) down toward the 4-bit budget
        assert any(r["weight_bits"] < 8 for name, r in rows.items() if name != "TOTAL")


def test_run_rejects_callback_options_for_a_method_without_callback(tmp_path):
    with pytest.raises(ValueError, match="callback_options=.*'lsq\\+' trains without a callback"):
        tfq.schemes.training_callbacks("lsq+", 4, callback_options={"lambda_": 0.1})
    with pytest.raises(ValueError, match="callback_options=.*'ddq' trains without a callback"):
        tfq.schemes.training_callbacks("ddq", 4, {"mode": "fixed"}, callback_options={"alpha": -0.01})


def test_reestimate_batch_norm_sets_the_average_batch_statistics():
    """Hand check: the moving statistics become the mean over batches of each batch's channel mean
    and (unbiased) variance of the BatchNorm's input; nothing else changes, momentum is restored."""
    keras.utils.set_random_seed(1)
    inp = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(4, 3, use_bias=False, name="conv")(inp)
    x = keras.layers.BatchNormalization(name="bn")(conv)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(x))
    model = keras.Model(inp, keras.layers.Dense(3)(x))
    q = tfq.quantize_model(model, "lsq+", weight_bits=4, activation_bits=4)
    images = np.random.default_rng(0).random((40, 8, 8, 1)).astype(np.float32)
    tfq.calibrate(q, images[:16])
    bn = tfq.costs.inner_layer(q.get_layer("bn"))
    others = {v.name: v.numpy().copy() for v in q.variables
              if v is not bn.moving_mean and v is not bn.moving_variance}
    conv_out = keras.Model(q.input, q.get_layer("quant_conv").output)
    means, variances = [], []
    for batch in (images[:16], images[16:32], images[32:]):
        y = np.asarray(conv_out(batch, training=False), np.float64).reshape(-1, 4)
        means.append(y.mean(0))
        variances.append(y.var(0, ddof=1))
    assert train.reestimate_batch_norm(q, images, batch_size=16) == 1
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean(means, 0), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(), np.mean(variances, 0), rtol=1e-4, atol=1e-6)
    assert bn.momentum == pytest.approx(0.99)
    for v in q.variables:
        if v.name in others:
            np.testing.assert_array_equal(v.numpy(), others[v.name], err_msg=v.name)
    with pytest.raises(ValueError, match="images must be a non-empty array"):
        train.reestimate_batch_norm(q, np.zeros((0, 8, 8, 1)))
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2"):
        train.reestimate_batch_norm(q, images, batch_size=1)


def test_initial_moving_average_share_is_momentum_to_the_steps():
    inp = keras.Input((8, 8, 1))
    x = keras.layers.BatchNormalization(momentum=0.9)(keras.layers.Conv2D(2, 3)(inp))
    x = keras.layers.BatchNormalization(momentum=0.99)(x)
    model = keras.Model(inp, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
    assert train.initial_moving_average_share(model, 100) == pytest.approx(0.99 ** 100)
    no_bn = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    assert train.initial_moving_average_share(no_bn, 1) == 0.0


def test_a_short_float_budget_re_estimates_batch_norm_and_a_long_one_does_not(tmp_path, monkeypatch):
    """4 steps leave 0.99**4 of BatchNorm's initial moving statistics: float_model replaces them with
    the batch statistics of the first training examples (re-estimating again changes nothing) and
    caches the checkpoint under a _bnre name; with the limit above that share it keeps the trained
    moving averages and the plain name."""
    net, path = train.float_model("digits", "small_cnn", epochs=1, batch_size=64, limit=256,
                                  cache_dir=str(tmp_path), verbose=0)
    assert path.endswith("_n256_bnre.h5") and os.path.exists(path)
    from tfq.callbacks.bias_grid import batch_norm_layers
    layers = batch_norm_layers(net)
    trained = [(layer.moving_mean.numpy().copy(), layer.moving_variance.numpy().copy()) for layer in layers]
    assert train.reestimate_batch_norm(net, data.load_numpy("digits", "train", limit=256)[0]) == len(layers) > 0
    for layer, (mean, variance) in zip(layers, trained):
        np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5, atol=1e-6)
        assert not np.allclose(variance, 1.0)  # not the initial values

    monkeypatch.setattr(train, "BN_INITIAL_SHARE_LIMIT", 1.0)
    net, path = train.float_model("digits", "small_cnn", epochs=1, batch_size=64, limit=256,
                                  cache_dir=str(tmp_path), verbose=0)
    assert path.endswith("_n256.h5")
    # 4 momentum-0.99 updates from (0, 1): the variances are still close to 1
    variance = batch_norm_layers(net)[0].moving_variance.numpy()
    assert np.all(variance > 0.99 ** 4 - 1e-6)
