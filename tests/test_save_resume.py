"""Nothing lost: save/load (h5 and SavedModel) and interrupted-then-resumed training, per method.

Save/load: a tiny quantized model is trained for a few steps (so every quantizer has moved away from
its initial values), saved, loaded inside ``tfq.quantize_scope()`` and compared with the original:
outputs, every variable (quantizer state included) and one more training step with a fresh optimizer
must be bit-identical.

Resume: ``fit`` interrupted by an exception at the end of epoch k and resumed from
``keras.callbacks.BackupAndRestore`` must end bit-identical to an uninterrupted ``fit`` with the same
seed, including the DDQ gate schedule and AdaQAT bit-width state.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras as keras

import tfq
from tfq.quantizers import adaqat as aq

#: quantize_model arguments of each trained method (middle conv at the method's low precision)
METHODS = {
    "lsq+": dict(method="lsq+", weight_bits=4, activation_bits=4),
    "n2uq": dict(method="n2uq", weight_bits=2, activation_bits=2),
    "ddq": dict(method="ddq", target_bits=4),
    "adaqat": dict(method="adaqat", weight_bits=6, activation_bits=6),
}
SHAPE = (8, 8, 1)
CLASSES = 3


def float_model(seed=0):
    keras.utils.set_random_seed(seed)
    inp = keras.Input(SHAPE, name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv1")(inp)
    x = keras.layers.Conv2D(6, 3, use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="logits")(x), name="tiny")


def data(n=32, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, *SHAPE)).astype(np.float32), rng.integers(0, CLASSES, n)


def compile_model(model, learning_rate=1e-2):
    # eager: tracing a train function costs more than the few steps these tests take
    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), run_eagerly=True)
    return model


def state(model):
    """``{layer/variable: value}`` of every model variable (layer weights and quantizer state), keyed
    by the (wrapper) layer name and the variable's own name: a loaded wrapper names its inner
    layer's variables ``quant_conv1/kernel`` where the original has ``conv1/kernel``."""
    values = {f"{layer.name}/{w.name.split('/')[-1]}": np.array(w.numpy())
              for layer in model.layers for w in layer.weights}
    assert len(values) == len(model.weights), "variable names must be unique to be compared"
    return values


def assert_same_state(a, b):
    sa, sb = state(a), state(b)
    assert sorted(sa) == sorted(sb)
    for name, value in sa.items():
        np.testing.assert_array_equal(value, sb[name], err_msg=name)


def trained(method):
    """A quantized tiny model after 3 training steps; AdaQAT's N, counters and frozen flag set by
    hand to values no initialiser produces."""
    q = tfq.quantize_model(float_model(), **METHODS[method])
    x, y = data()
    compile_model(q).fit(x, y, batch_size=8, epochs=1, steps_per_epoch=3, shuffle=False, verbose=0)
    if method == "adaqat":
        states = aq.adaqat_states(q)
        assert states["weight"] and states["activation"]
        for kind, n in (("weight", 4.37), ("activation", 5.61)):
            for s in states[kind]:
                s["bits"].assign(n)
                s["crossings"].assign(np.arange(aq.COUNTER_SIZE, dtype=np.int32) % 3)
                s["frozen"].assign(kind == "activation")
    return q


def quantizer_roles(model):
    from tfq.quantizers import base as qbase
    return {qbase.variable_role(w) for w in model.weights} - {None}


def check_round_trip(q, path):
    x, y = data(8, seed=2)
    q.save(path)
    with tfq.quantize_scope():
        loaded = keras.models.load_model(path, compile=False)
    np.testing.assert_array_equal(q(x, training=False), loaded(x, training=False))
    assert_same_state(q, loaded)
    # one more step from the same state with a fresh identical optimizer: identical weights
    for model in (q, loaded):
        compile_model(model, 1e-3).train_on_batch(x, y)
    assert_same_state(q, loaded)
    np.testing.assert_array_equal(q(x, training=False), loaded(x, training=False))
    return loaded


@pytest.mark.parametrize("method", sorted(METHODS))
def test_h5_round_trip_keeps_outputs_and_quantizer_state(method, tmp_path):
    q = trained(method)
    expected_roles = {"lsq+": {"offset"}, "n2uq": {"start", "lengths", "beta1", "beta2"},
                      "ddq": {"levels", "gates"},
                      "adaqat": {"weight_bits", "activation_bits", "bit_crossings", "bits_frozen", "alpha"}}
    assert expected_roles[method] <= quantizer_roles(q)  # the state compared below is the method's
    loaded = check_round_trip(q, str(tmp_path / "model.h5"))
    if method == "adaqat":
        got = {kind: [float(s["bits"].numpy()) for s in group] for kind, group in aq.adaqat_states(loaded).items()}
        assert set(np.float32(got["weight"])) == {np.float32(4.37)}
        assert set(np.float32(got["activation"])) == {np.float32(5.61)}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_savedmodel_round_trip_keeps_outputs_and_quantizer_state(method, tmp_path):
    check_round_trip(trained(method), str(tmp_path / "saved_model"))


def pwlq_model():
    x, _ = data(16, seed=3)
    return tfq.ptq.pwlq(float_model(), x, weight_bits=4, breakpoint="gaussian")


@pytest.mark.parametrize("fmt", ["h5", pytest.param("savedmodel", marks=pytest.mark.slow)])
def test_pwlq_round_trip(fmt, tmp_path):
    q = pwlq_model()
    assert {"breakpoint", "centre_scale", "tail_scale"} <= quantizer_roles(q)
    check_round_trip(q, str(tmp_path / ("model.h5" if fmt == "h5" else "saved_model")))


# --- resume -----------------------------------------------------------------------------------
EPOCHS, STEPS, BATCH = 3, 3, 8


class Interrupted(Exception):
    pass


class InterruptAfter(keras.callbacks.Callback):
    """Stops ``fit`` with an exception at the end of epoch ``epoch`` (a crash or preemption)."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupted(f"interrupted after epoch {epoch}")


def method_callbacks(method, model, loss):
    """(compiled loss, callbacks) of the method's training recipe, with rates that move the state
    within a few steps: DDQ's ramp projects at steps 2, 4, 6 (and freezes at 6); AdaQAT's N crosses
    integers and may freeze (oscillation_limit=1)."""
    if method == "ddq":
        schedule = tfq.callbacks.DDQGateSchedule(target_bits=3, ramp=0.7, stages=3)
        return schedule.constrained_loss(model, loss), [schedule]
    if method == "adaqat":
        return loss, [tfq.callbacks.AdaQAT(lambda_=0.5, lr_weight=0.15, lr_activation=0.1, oscillation_limit=1)]
    return loss, []


def fit(method, backup_dir, interrupt_after=None, via="backup", initial_epoch=0, saver_first=False):
    """A fresh process's run: same seed, same model. ``via="backup"``: ``BackupAndRestore`` resumes
    from ``backup_dir`` when it holds a backup; ``via="checkpoint"``: ``ModelCheckpoint`` writes
    TF-format weights (optimizer and schedule state included) there after every epoch, loaded
    before a fit that starts at ``initial_epoch`` > 0. Returns the model and the method's callbacks."""
    q = tfq.quantize_model(float_model(), **METHODS[method])
    x, y = data(EPOCHS * BATCH)
    loss, callbacks = method_callbacks(method, q, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    q.compile(optimizer=keras.optimizers.Adam(1e-2), loss=loss, run_eagerly=True)
    if via == "backup":
        saver = keras.callbacks.BackupAndRestore(str(backup_dir))
    else:
        path = str(backup_dir / "weights")
        saver = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
        if initial_epoch:
            q.load_weights(path)
    extra = [InterruptAfter(interrupt_after)] if interrupt_after is not None else []
    # the method's callbacks first (the recommended order): the state is saved after they have run
    # at epoch end; the restore then happens after their on_train_begin
    ordered = [saver] + callbacks if saver_first else callbacks + [saver]
    q.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, verbose=0, initial_epoch=initial_epoch,
          callbacks=ordered + extra)
    return q, callbacks


def check_resume(method, tmp_path, interrupt_after, via="backup", saver_first=False):
    reference, ref_callbacks = fit(method, tmp_path / "uninterrupted", via=via, saver_first=saver_first)
    with pytest.raises(Interrupted):
        fit(method, tmp_path / "backup", interrupt_after, via=via, saver_first=saver_first)
    assert os.listdir(tmp_path / "backup"), "no backup was written"
    resumed, callbacks = fit(method, tmp_path / "backup", via=via, saver_first=saver_first,
                             initial_epoch=interrupt_after + 1 if via == "checkpoint" else 0)
    assert_same_state(reference, resumed)
    assert int(resumed.optimizer.iterations.numpy()) == EPOCHS * STEPS
    return reference, ref_callbacks, resumed, callbacks


def test_resume_lsq_plus_equals_uninterrupted_run(tmp_path):
    check_resume("lsq+", tmp_path, interrupt_after=0)


@pytest.mark.parametrize("interrupt_after, saver_first", [(0, False), pytest.param(1, False, marks=pytest.mark.slow),
                                                         pytest.param(0, True, marks=pytest.mark.slow)])
def test_resume_ddq_gate_schedule_equals_uninterrupted_run(tmp_path, interrupt_after, saver_first):
    reference, (ref_schedule,), resumed, (schedule,) = check_resume("ddq", tmp_path, interrupt_after,
                                                                    saver_first=saver_first)
    assert ref_schedule.layer_bits() == schedule.layer_bits()
    assert float(ref_schedule.budget.numpy()) == float(schedule.budget.numpy())
    assert ref_schedule.frozen and schedule.frozen
    assert ref_schedule.history[-1] == schedule.history[-1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lsq+", "ddq"])
def test_resume_from_model_checkpoint_weights_equals_uninterrupted_run(tmp_path, method):
    check_resume(method, tmp_path, interrupt_after=0, via="checkpoint")


@pytest.mark.slow
def test_resume_adaqat_equals_uninterrupted_run(tmp_path):
    reference, (ref_callback,), resumed, (callback,) = check_resume("adaqat", tmp_path, interrupt_after=0)
    assert ref_callback.current() == callback.current()
    # the reference's N moved: the comparison covers a changing state
    assert ref_callback.history["weight_N"][0] != ref_callback.history["weight_N"][-1]


# --- determinism --------------------------------------------------------------------------------
#: metrics that legitimately differ between two runs: timings, the machine, paths inside the run dir
RUN_SPECIFIC = ("epoch_seconds", "total_seconds", "machine", "float_checkpoint")


def h5_weights(path):
    import h5py
    found = {}
    with h5py.File(path, "r") as f:
        f["model_weights"].visititems(
            lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return found


@pytest.mark.slow
def test_tfq_train_with_a_seed_is_identical_run_to_run(tmp_path):
    """Two CLI processes (different Python hash seeds, so set iteration orders differ too) with the
    same --seed: identical metrics and identical float and quantized weights."""
    runs = []
    for i in (1, 2):
        run_dir = tmp_path / f"run{i}"
        cmd = [sys.executable, "-m", "tfq.cli", "train", "--dataset=digits", "--model=small_cnn", "--method=lsq+",
               "--limit=256", "--float_epochs=1", "--epochs=1", "--batch_size=32", "--seed=3", f"--run_dir={run_dir}"]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                             env={**os.environ, "PYTHONHASHSEED": str(i)})
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(run_dir)
    metrics = [json.loads((r / "metrics.json").read_text()) for r in runs]
    same = [{k: v for k, v in m.items() if k not in RUN_SPECIFIC} for m in metrics]
    assert same[0] == same[1]
    assert same[0]["quantizers"]  # the comparison covers the learned quantizer parameters
    for name in ("float.h5", "quantized.h5"):
        first, second = (h5_weights(r / name) for r in runs)
        assert first and sorted(first) == sorted(second)
        for key, value in first.items():
            np.testing.assert_array_equal(value, second[key], err_msg=f"{name}: {key}")
