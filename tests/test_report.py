"""`tfq report`: per-layer table, JSON, PNGs and TensorBoard summaries of tiny runs (digits)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq import costs, report, train
from tfq.export.runs import load_run_model
from tfq.quantizers import grid as g
from tfq.quantizers.pwlq import ShiftedGrid

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = dict(dataset="digits", model="small_cnn", float_epochs=1, epochs=1, batch_size=64, limit=256, verbose=0)


@pytest.fixture(scope="module")
def float_cache(tmp_path_factory):
    """One float checkpoint cache for every run of this module (same TINY recipe: trained once)."""
    return str(tmp_path_factory.mktemp("float_cache"))


def _assert_png(path):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE, path
    image = tf.io.decode_png(data)
    assert image.shape[0] > 50 and image.shape[1] > 50


def _tensorboard_scalars(log_dir):
    values = {}
    for name in os.listdir(log_dir):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "scalars":
                    values[v.tag] = float(tf.make_ndarray(v.tensor))
    return values


def _effective_bits(quantizer, qvars):
    return 32.0 if quantizer is None else float(quantizer.effective_bits(qvars))


def _check_common(run_dir, rep, expected_bits=None):
    """Rows = weighted layers; bits = the quantizers' effective bits; memory sums to
    tfq.costs.weight_memory; PNGs valid; JSON and markdown written."""
    model = load_run_model(str(run_dir))
    layer_costs = costs.layer_costs(model)
    assert [r["layer"] for r in rep["layers"]] == [c.name for c in layer_costs]
    assert len(rep["layers"]) == 4  # small_cnn: three Conv2D and the Dense logits
    for row, c in zip(rep["layers"], layer_costs):
        assert row["weight_bits"] == _effective_bits(c.weight_quantizer, c.weight_vars)
        assert row["activation_bits"] == _effective_bits(c.activation_quantizer, c.activation_vars)
        assert row["weight_memory_bits"] == row["params"] * row["weight_bits"]
    if expected_bits is not None:
        assert [(r["weight_bits"], r["activation_bits"]) for r in rep["layers"]] == expected_bits
    total = sum(r["weight_memory_bits"] for r in rep["layers"])
    assert total == pytest.approx(float(costs.weight_memory(model)), rel=1e-6)
    assert rep["totals"]["weight_memory_bits"] == pytest.approx(total, rel=1e-6)
    assert rep["totals"]["bitops"] == pytest.approx(sum(r["bitops"] for r in rep["layers"]), rel=1e-6)
    out = os.path.join(run_dir, "report")
    for name in ("bits.png", "weight_levels.png", "activation_levels.png"):
        _assert_png(os.path.join(out, name))
    with open(os.path.join(out, "report.json")) as f:
        assert json.load(f)["layers"] == json.loads(json.dumps(rep["layers"]))
    with open(os.path.join(out, "report.md")) as f:
        text = f.read()
    for r in rep["layers"]:
        assert f"| {r['layer']} |" in text
    return model, layer_costs


# --- a trained LSQ+ run, reported through the CLI ----------------------------------------------
@pytest.fixture(scope="module")
def lsq_run(tmp_path_factory, float_cache):
    run_dir = tmp_path_factory.mktemp("lsq_run")
    train.run(str(run_dir), method="lsq+", weight_bits=4, activation_bits=4, cache_dir=float_cache, **TINY)
    keras.backend.clear_session()
    out = subprocess.run([sys.executable, "-m", "tfq.cli", "report", str(run_dir), "--report_examples=64"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "4 weighted layers" in out.stdout
    with open(run_dir / "report" / "report.json") as f:
        return run_dir, json.load(f)


def test_lsq_report_table_bits_memory_and_pngs(lsq_run):
    run_dir, rep = lsq_run
    # first and last layers at first_last_bits=8, the middle ones at W4; inputs of the middle layers
    # are 4-bit activations, the first layer reads the 8-bit model input, the last an 8-bit tensor
    _check_common(run_dir, rep, expected_bits=[(8, 8), (4, 4), (4, 4), (8, 8)])
    assert rep["method"] == "lsq+" and rep["dataset"] == "digits"
    assert rep["trajectories"] == {} and rep["trajectory_note"].startswith("no bit-width trajectory")
    assert not os.path.exists(run_dir / "report" / "trajectories.png")
    with open(run_dir / "report" / "report.md") as f:
        assert "no bit-width trajectory" in f.read()
    middle = rep["layers"][1]
    assert middle["weight_grid"]["grid"] == "UniformGrid" and middle["weight_grid"]["per_channel"]
    assert (middle["weight_grid"]["qmin"], middle["weight_grid"]["qmax"]) == (-8, 7)
    assert middle["activation_grid"]["grid"] == "UniformGrid"
    assert (middle["activation_grid"]["qmin"], middle["activation_grid"]["qmax"]) == (0, 15)


def test_lsq_weight_mse_equals_the_grid_round_trip(lsq_run):
    """Hand check through the NumPy grid: W -> codes (round half to even, clip) -> values."""
    run_dir, rep = lsq_run
    model = load_run_model(str(run_dir))
    layer = model.get_layer(rep["layers"][1]["layer"])
    kernel, quantizer, qvars = costs.weight_quantizers(layer)[0]
    grid = quantizer.integer_grid(qvars)
    w = kernel.numpy().astype(np.float64)
    scale = grid.scale.reshape(1, 1, 1, -1)
    values = np.clip(np.round(w / scale), -8, 7) * scale
    expected = float(np.mean((w - values) ** 2))
    assert rep["layers"][1]["weight_mse"] == pytest.approx(expected, rel=1e-4)
    assert 0 < expected < float(np.mean(w ** 2))
    assert not any(r["kernel_on_grid"] for r in rep["layers"])  # QAT keeps float shadow weights
    # activation MSE is measured (64 digits test images) and is small next to the tensor's scale
    step = rep["layers"][1]["activation_grid"]["scale"]
    assert 0 < rep["layers"][1]["activation_mse"] < step ** 2


def test_lsq_report_tensorboard_holds_the_same_numbers(lsq_run):
    run_dir, rep = lsq_run
    log_dir = run_dir / "report" / "tensorboard"
    scalars = _tensorboard_scalars(str(log_dir))
    for r in rep["layers"]:
        assert scalars[f"report/{r['layer']}/weight_bits"] == r["weight_bits"]
        assert scalars[f"report/{r['layer']}/weight_mse"] == pytest.approx(r["weight_mse"], rel=1e-6)
    assert scalars["report/total/weight_memory_bits"] == pytest.approx(rep["totals"]["weight_memory_bits"])


# --- AdaQAT: a run trained with the callback has a bit-width trajectory -------------------------------
def test_adaqat_report_plots_the_logged_trajectory(tmp_path, float_cache):
    from tfq import data
    from tfq.callbacks import AdaQAT
    from tfq.quantizers import adaqat as aq
    run_dir = tmp_path / "adaqat"
    net, _ = train.float_model("digits", "small_cnn", epochs=1, batch_size=64, limit=256,
                               cache_dir=float_cache, verbose=0)
    q = tfq.quantize_model(net, method="adaqat", weight_bits=4, activation_bits=4)
    train.compile_model(q, 1e-3)
    callback = AdaQAT(lr_weight=0.5, lr_activation=0.5, log_dir=str(run_dir / "logs"))
    q.fit(data.load("digits", "train", batch_size=64, limit=128), epochs=1, verbose=0, callbacks=[callback])
    q.save(str(run_dir / "quantized.h5"))
    with open(run_dir / "metrics.json", "w") as f:
        json.dump({"method": "adaqat", "dataset": "digits"}, f)
    rep = report.write_report(str(run_dir), examples=32, log=lambda *_: None)

    model, layer_costs = _check_common(run_dir, rep)
    steps = callback.history["step"]
    assert len(steps) == 2  # 128 examples / batch 64
    logged = rep["trajectories"]["adaqat/weight_N"]
    assert logged["steps"] == steps
    np.testing.assert_allclose(logged["values"], callback.history["weight_N"], rtol=1e-6)
    np.testing.assert_allclose(rep["trajectories"]["adaqat/activation_N"]["values"],
                               callback.history["activation_N"], rtol=1e-6)
    _assert_png(run_dir / "report" / "trajectories.png")
    # middle layers: DoReFa weights at ceil(N_w), PACT inputs at ceil(N_a) (the learned state)
    n_w = callback.current()["weight"]["bits"]
    n_a = callback.current()["activation"]["bits"]
    middle = [r for r, c in zip(rep["layers"], layer_costs) if isinstance(c.weight_quantizer, aq.DoReFaWeightQuantizer)]
    assert middle and all(r["weight_bits"] == n_w for r in middle)
    assert all(r["activation_bits"] == n_a for r in middle if r["activation_quantizer"] == "PACTQuantizer")
    for r in middle:  # DoReFa grid: odd codes [-n, n], n = 2^k - 1, k + 1 bits
        assert r["weight_grid"]["qmax"] == 2 ** n_w - 1 and r["weight_grid"]["bits"] == n_w + 1


# --- N2UQ thresholds, DDQ levels -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("method,weight_grid,activation_grid", [
    ("n2uq", "UniformGrid", "ThresholdGrid"),
    ("ddq", "CodebookGrid", "CodebookGrid"),
])
def test_learned_levels_and_thresholds_are_reported(tmp_path, float_cache, method, weight_grid, activation_grid):
    run_dir = tmp_path / method
    train.run(str(run_dir), method=method, weight_bits=2, activation_bits=2, cache_dir=float_cache, **TINY)
    rep = report.write_report(str(run_dir), examples=32, log=lambda *_: None)
    model, layer_costs = _check_common(run_dir, rep)
    row, c = rep["layers"][1], layer_costs[1]
    assert row["weight_grid"]["grid"] == weight_grid
    assert row["activation_grid"]["grid"] == activation_grid
    a_grid = c.activation_quantizer.integer_grid(c.activation_vars)
    if activation_grid == "ThresholdGrid":
        assert len(row["activation_grid"]["thresholds"]) == 2 ** 2 - 1
        np.testing.assert_allclose(row["activation_grid"]["thresholds"], a_grid.thresholds)
        assert row["activation_grid_text"].startswith("thresholds ")
    else:
        np.testing.assert_array_equal(row["activation_grid"]["levels_int8"], a_grid.levels_int8)
        w_grid = c.weight_quantizer.integer_grid(c.weight_vars)
        assert np.asarray(row["weight_grid"]["levels_int8"]).shape == w_grid.levels_int8.shape
        assert rep["layers"][1]["weight_grid_text"].startswith("codebook ")
    assert row["weight_mse"] > 0 and row["activation_mse"] is not None


# --- PWLQ post-training run ---------------------------------------------------------------------------
def test_pwlq_run_reports_breakpoints(tmp_path, float_cache):
    from tfq import data
    run_dir = tmp_path / "pwlq"
    run_dir.mkdir()
    net, _ = train.float_model("digits", "small_cnn", epochs=1, batch_size=64, limit=256,
                               cache_dir=float_cache, verbose=0)
    x, _ = data.load_numpy("digits", "train", limit=128)
    q = tfq.ptq.pwlq(net, x, weight_bits=4, breakpoint="gaussian")
    q.save(str(run_dir / "quantized.h5"))
    with open(run_dir / "metrics.json", "w") as f:
        json.dump({"method": "pwlq", "dataset": "digits"}, f)
    rep = report.write_report(str(run_dir), examples=32, log=lambda *_: None)
    model, layer_costs = _check_common(run_dir, rep)
    row, c = rep["layers"][1], layer_costs[1]
    assert row["weight_grid"]["grid"] == "PiecewiseGrid"
    w_grid = c.weight_quantizer.integer_grid(c.weight_vars)
    inner = w_grid.grid if isinstance(w_grid, ShiftedGrid) else w_grid
    np.testing.assert_allclose(row["weight_grid"]["breakpoint"], inner.breakpoint)
    assert row["weight_bits"] == inner.bits_per_piece + 2  # sign and region bits
    # PTQ stores the quantized kernel: Q(W) = W, which the report says instead of an MSE
    assert all(r["kernel_on_grid"] for r in rep["layers"])
    with open(run_dir / "report" / "report.md") as f:
        assert "0 (kernel on its grid)" in f.read()
    assert "no bit-width trajectory" in rep["trajectory_note"]


# --- pieces that need no training ------------------------------------------------------------------------
def test_grid_marks_by_hand():
    uniform = g.UniformGrid(scale=[0.5, 2.0], zero_point=[0, 0], bits=2, qmin=-2, qmax=1, axis=3)
    assert report.grid_marks(uniform, channel=1)["levels"] == [-4.0, -2.0, 0.0, 2.0]
    asym = g.UniformGrid(scale=0.25, zero_point=3, bits=8, qmin=0, qmax=255)
    marks = report.grid_marks(asym)
    assert marks["levels"] == [] and marks["range"] == (-0.75, 63.0)  # 256 codes: drawn as a range
    piecewise = g.PiecewiseGrid(breakpoint=[1.0], centre_scale=[0.5], tail_scale=[1.0], bits_per_piece=1, axis=3)
    marks = report.grid_marks(piecewise)
    # centre codes 0, 1 -> 0, 0.5; tail codes 0, 1 -> 1, 2; mirrored
    assert marks["levels"] == [-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0]
    assert marks["breakpoints"] == [-1.0, 1.0]
    shifted = report.grid_marks(ShiftedGrid(piecewise, shift=[0.25], axis=3))
    assert shifted["breakpoints"] == [-0.75, 1.25]
    codebook = g.CodebookGrid(levels_int8=[[-100, 0, 0, 50], [-3, -1, 1, 3]], scale=[0.01, 0.5], bits=2, axis=3)
    assert report.grid_marks(codebook, channel=1)["levels"] == [-1.5, -0.5, 0.5, 1.5]
    assert report.grid_marks(codebook)["levels"] == [-1.0, 0.0, 0.5]  # repeated level drawn once
    thresholds = g.ThresholdGrid(thresholds=[0.1, 0.4, 0.9], out_scale=0.5, out_zero_point=0, bits=2)
    assert report.grid_marks(thresholds)["thresholds"] == [0.1, 0.4, 0.9]
    data, text = report.describe_grid(ShiftedGrid(piecewise, shift=[0.25], axis=3))
    assert data["grid"] == "PiecewiseGrid" and data["shift"] == [0.25] and "shift" in text


def test_read_trajectories_from_event_files(tmp_path):
    writer = tf.summary.create_file_writer(str(tmp_path / "logs" / "adaqat"))
    with writer.as_default():
        for step, (n, loss) in enumerate([(8.0, 1.0), (7.6, 0.9), (7.1, 0.8)]):
            tf.summary.scalar("adaqat/weight_N", n, step=step)
            tf.summary.scalar("adaqat/loss", loss, step=step)  # not a bit-width: ignored
            tf.summary.scalar("ddq/bits/block2_conv", 8.0 - step, step=step)
    writer.close()
    found = report.read_trajectories(str(tmp_path / "logs"))
    assert sorted(found) == ["adaqat/weight_N", "ddq/bits/block2_conv"]
    steps, values = found["adaqat/weight_N"]
    assert steps == [0, 1, 2]
    np.testing.assert_allclose(values, [8.0, 7.6, 7.1], rtol=1e-6)
    assert found["ddq/bits/block2_conv"][1] == [8.0, 7.0, 6.0]


def test_bad_arguments_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="run_dir"):
        report.write_report(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="examples must be an integer >= 0"):
        report.write_report(str(tmp_path), examples=-1)
    with pytest.raises(FileNotFoundError, match="quantized.h5"):
        report.write_report(str(tmp_path), examples=0)
