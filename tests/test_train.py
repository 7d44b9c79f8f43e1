"""The main job end to end on a small slice of real Fashion-MNIST (CLI, run directory)."""
import json
import os
import subprocess
import sys

import pytest
import tf_keras as keras

import tfq
from tfq import data

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
    assert list((run_dir / "logs").rglob("events.out.tfevents*"))
    with tfq.quantize_scope():
        q = keras.models.load_model(run_dir / "quantized.h5", compile=False)
    assert q.output_shape == (None, 10)


def test_cli_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "tfq.cli", "fly"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "COMMAND is one of train" in (out.stdout + out.stderr)


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
