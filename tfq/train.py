"""The main job: train (or load) a float model, fine-tune its quantized version, evaluate both,
and write a run directory.

Run directory layout::

    RUN_DIR/
      float.h5              the float model (Keras 2 h5)
      quantized.h5          the quantized model (load inside tfq.quantize_scope()), its biases
                            snapped onto the integer model's int32 grid (tfq.export.snap_biases)
      metrics.json          options, accuracies, epoch times, per-quantizer parameters
      logs/                 TensorBoard: losses, accuracies, every quantizer's scale/offset
"""
from __future__ import annotations

import json
import os
import platform
import time

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq import costs, kernels, schemes
from tfq import data as tfq_data
from tfq import models as tfq_models
from tfq.api import calibrate, is_calibrated, quantize_model, quantize_scope
from tfq.quantizers import base as qbase

def learned_roles():
    """Roles of quantizer variables worth reporting (all registered ones but the init flag)."""
    return [role for role in qbase.VARIABLE_ROLES if role != "initialized"]


def compile_model(model, learning_rate, steps=None, callbacks=()):
    """Adam (cosine decay over ``steps``), cross-entropy on logits, accuracy. A callback with a
    ``constrained_loss(model, loss)`` (DDQ's memory-constrained loss, ddq.txt sec. 3.1) wraps the loss."""
    lr = learning_rate
    if steps:
        lr = keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps=steps)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    for callback in callbacks:
        if hasattr(callback, "constrained_loss"):
            loss = callback.constrained_loss(model, loss)
    model.compile(optimizer=keras.optimizers.Adam(lr), loss=loss, metrics=["accuracy"])
    return model


class EpochTimer(keras.callbacks.Callback):
    """Wall-clock seconds of every epoch (the first includes tracing)."""

    def on_train_begin(self, logs=None):
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def quantizer_parameters(model):
    """``{variable name: value}`` of every quantizer variable (scales, offsets, ...)."""
    return {w.name: np.asarray(w.numpy()).tolist() for w in model.weights
            if qbase.variable_role(w, learned_roles())}


class QuantizerSummaries(keras.callbacks.Callback):
    """Writes every quantizer scale/offset to TensorBoard after each epoch (scalars for
    per-tensor values, histograms for per-channel ones)."""

    def __init__(self, log_dir):
        super().__init__()
        self.writer = tf.summary.create_file_writer(os.path.join(log_dir, "quantizers"))

    def on_epoch_end(self, epoch, logs=None):
        with self.writer.as_default():
            for weight in self.model.weights:
                if not qbase.variable_role(weight, learned_roles()):
                    continue
                value = weight.numpy()
                name = weight.name.split(":")[0]
                if np.ndim(value) == 0:
                    tf.summary.scalar(name, float(value), step=epoch)
                else:
                    tf.summary.histogram(name, value, step=epoch)
        self.writer.flush()


def _dataset(name, split, batch_size, limit, seed):
    return tfq_data.load(name, split, batch_size=batch_size, limit=limit, seed=seed)


#: ``float_model`` re-estimates BatchNorm statistics after training when the moving averages still
#: hold more than this share of their initial values (mean 0, variance 1): momentum ** steps.
#: Early layers' variances are ~0.002-0.05 here, so 3 epochs on 20,000 images (471 steps, share
#: 0.009) left moving variances up to 10x too large and mobile_swish at 0.20 test accuracy (0.87
#: re-estimated); the protocol's 3 epochs on 60,000 images (1,407 steps, 7e-7) are far below it.
BN_INITIAL_SHARE_LIMIT = 1e-4


def initial_moving_average_share(model, steps):
    """The largest share that any BatchNorm layer's initial moving statistics still hold after
    ``steps`` training steps (``momentum ** steps``); 0.0 for a model without BatchNorm."""
    from tfq.callbacks.bias_grid import batch_norm_layers
    return max((float(layer.momentum) ** int(steps) for layer in batch_norm_layers(model)), default=0.0)


def float_model(dataset="fashion_mnist", model="mobile_swish", epochs=3, batch_size=128,
                learning_rate=2e-3, seed=0, limit=None, cache_dir=None, verbose=1):
    """Train a float model with a fixed recipe, or load it from ``cache_dir`` if present.

    A budget too short for BatchNorm's moving averages to forget their initial values
    (``initial_moving_average_share`` above ``BN_INITIAL_SHARE_LIMIT``) ends with
    ``reestimate_batch_norm`` on the first ``BN_REESTIMATE_EXAMPLES`` training examples; such a
    checkpoint's cache name ends in ``_bnre``."""
    keras.utils.set_random_seed(seed)
    net = tfq_models.get(model, input_shape=tfq_data.INPUT_SHAPE[dataset],
                         num_classes=tfq_data.NUM_CLASSES[dataset], seed=seed)
    train = _dataset(dataset, "train", batch_size, limit, seed)
    steps = epochs * int(train.cardinality())
    share = initial_moving_average_share(net, steps)
    reestimate = share > BN_INITIAL_SHARE_LIMIT
    cache_path = None
    if cache_dir:
        os.makedirs(cache_dir, exist_ok=True)
        tag = f"{dataset}_{model}_e{epochs}_b{batch_size}_lr{learning_rate}_s{seed}_n{limit or 'all'}"
        cache_path = os.path.join(cache_dir, f"{tag}{'_bnre' if reestimate else ''}.h5")
        if os.path.exists(cache_path):
            with quantize_scope():
                return keras.models.load_model(cache_path, compile=False), cache_path
    compile_model(net, learning_rate, steps=steps)
    net.fit(train, epochs=epochs, verbose=verbose)
    if reestimate:
        examples = BN_REESTIMATE_EXAMPLES if limit is None else min(BN_REESTIMATE_EXAMPLES, int(limit))
        reestimate_batch_norm(net, tfq_data.load_numpy(dataset, "train", limit=examples)[0])
        if verbose:
            print(f"float model: {steps} steps leave BatchNorm's moving averages {share:.1e} of their "
                  f"initial values; re-estimated them from {examples} training examples")
    if cache_path:
        net.save(cache_path)
    return net, cache_path


def evaluate(model, dataset, batch_size=256, limit=None):
    test = tfq_data.load(dataset, "test", batch_size=batch_size, limit=limit)
    if not model.optimizer:
        compile_model(model, 1e-3)
    _, acc = model.evaluate(test, verbose=0)
    return float(acc)


def finetune(model, dataset, epochs, batch_size=128, learning_rate=5e-4, seed=0, limit=None,
             log_dir=None, verbose=1, callbacks=()):
    """Fine-tune ``model`` (float or quantized) with the shared budget; returns epoch seconds."""
    keras.utils.set_random_seed(seed)
    train = _dataset(dataset, "train", batch_size, limit, seed)
    compile_model(model, learning_rate, steps=max(1, epochs * int(train.cardinality())), callbacks=callbacks)
    if not is_calibrated(model):
        calibrate(model, train, steps=1)  # eagerly, so the traced step leaves the init branches out
    timer = EpochTimer()
    cbs = [timer, *callbacks]
    if log_dir:
        cbs += [keras.callbacks.TensorBoard(log_dir, update_freq="epoch", profile_batch=0),
                QuantizerSummaries(log_dir)]
    model.fit(train, epochs=epochs, verbose=verbose, callbacks=cbs)
    return timer.seconds


def machine_info():
    import ai_edge_litert
    import tensorflow_model_optimization as tfmot
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "tensorflow": tf.__version__, "tfmot": tfmot.__version__,
            "litert": getattr(ai_edge_litert, "__version__", "unknown"), "python": platform.python_version(),
            "fused_kernels": kernels.available(), "date": time.strftime("%Y-%m-%d")}


def _check_count(value, minimum, message):
    """Raise ``ValueError(message + ", got <value>")`` unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{message}, got {value!r}")


def reestimate_batch_norm(model, images, batch_size=256):
    """Set every BatchNormalization's moving mean and variance to the average, over ``images`` (an
    array, in batches), of the batch statistics the trained network produces in training mode;
    every other variable (weights, quantizer state written by training-mode calls) is restored.

    After a short low-bit fine-tune the moving statistics still describe the float network (BN
    momentum 0.99), and inference-mode accuracy suffers: re-estimating them is the usual last
    step of QAT. Returns the number of BatchNorm layers updated. Call it before ``snap_biases``
    (the int32 bias grid depends on these statistics).
    """
    images = np.asarray(images, np.float32)
    if images.ndim < 2 or len(images) == 0:
        raise ValueError(f"images must be a non-empty array of examples, got shape {images.shape}")
    _check_count(batch_size, 2, "batch_size must be an integer >= 2 (batch statistics)")
    from tfq.callbacks.bias_grid import batch_norm_layers
    layers = batch_norm_layers(model)
    statistics = {id(v) for layer in layers for v in (layer.moving_mean, layer.moving_variance)}
    others = [(v, v.numpy()) for v in model.variables if id(v) not in statistics]
    momenta = [layer.momentum for layer in layers]
    sums = [[np.zeros(layer.moving_mean.shape), np.zeros(layer.moving_variance.shape)] for layer in layers]
    batches = [images[i:i + batch_size] for i in range(0, len(images), batch_size)]
    batches = [b for b in batches if len(b) > 1] or batches
    for layer in layers:
        layer.momentum = 0.0  # moving statistics := this batch's statistics
    try:
        for batch in batches:
            model(tf.constant(batch), training=True)
            for total, layer in zip(sums, layers):
                total[0] += layer.moving_mean.numpy() / len(batches)
                total[1] += layer.moving_variance.numpy() / len(batches)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
        for variable, value in others:
            variable.assign(value)
    for layer, (mean, variance) in zip(layers, sums):
        layer.moving_mean.assign(mean.astype(np.float32))
        layer.moving_variance.assign(variance.astype(np.float32))
    return len(layers)


#: training examples ``run`` gives ``tfq.export.guard_ties`` after the snaps (0: no tie guard)
TIE_GUARD_EXAMPLES = 256


def snap_biases_for_export(model, tie_guard_images=None):
    """``tfq.export.snap_biases`` (biases onto the integer model's int32 grid),
    ``tfq.export.snap_hard_swish`` (hard swish as TFLite's int8 kernel computes it) and, given
    ``tie_guard_images``, ``tfq.export.guard_ties`` (biases a whole accumulator step away from rounding
    ties those images hit), so the saved Keras model computes what its export computes; a model that
    cannot be exported keeps its biases and the returned dict says why."""
    from tfq.export.tflite import ExportError, guard_ties, snap_biases, snap_hard_swish
    try:
        rows = snap_biases(model)
    except ExportError as err:
        return {"changed": False, "error": str(err)}
    hard_swish = [r for r in snap_hard_swish(model) if r["changed"]]
    guarded = guard_ties(model, tie_guard_images) if tie_guard_images is not None and len(tie_guard_images) else []
    moved = [r["max_output_steps"] for r in rows if r.get("max_output_steps") is not None]
    return {"changed": any(r["changed"] for r in rows) or bool(hard_swish) or bool(guarded), "layers": len(rows),
            "max_output_steps_moved": max(moved) if moved else 0.0,
            "hard_swish_layers": len(hard_swish),
            "hard_swish_codes_moved": sum(r["codes_moved"] for r in hard_swish),
            "tie_guard_examples": 0 if tie_guard_images is None else int(len(tie_guard_images)),
            "tie_guard_channels_moved": sum(r["channels_moved"] for r in guarded)}


def finetune_on_bias_grid(model, dataset, steps, learning_rate=1e-4, batch_size=128, seed=0, limit=None,
                          bias_update="straight_through", verbose=0):
    """Short end phase of QAT on the integer model's int32 bias grid (export issue 3).

    For ``steps`` optimizer steps (Adam, cosine decay from ``learning_rate``) every
    BatchNormalization runs in inference mode with frozen moving statistics, and
    ``tfq.callbacks.BiasGridProjection(bias_update)`` keeps each folded bias on its accumulator grid
    ``s_in * s_w'`` after every step, so the Keras forward equals the integer model's. Ends with an
    exact ``tfq.export.snap_biases``; BatchNorm then runs in its own mode again (``trainable`` flags
    unchanged; gamma and beta train in the phase, see ``tfq.callbacks.bias_grid``). ``dataset``:
    a dataset name (``tfq.data.load``) or a ``tf.data.Dataset`` of ``(image, label)`` batches,
    repeated as needed. Returns ``{"steps", "seconds", "max_output_steps_moved"}`` (the final snap's
    largest move, ~0 since the phase ends on the grid).
    """
    from tfq.callbacks.bias_grid import BiasGridProjection, frozen_batch_norm
    _check_count(steps, 1, "steps must be a positive integer (optimizer steps of the bias-grid phase)")
    if isinstance(learning_rate, bool) or not isinstance(learning_rate, (int, float)) or not learning_rate > 0:
        raise ValueError(f"learning_rate must be > 0, got {learning_rate!r}")
    keras.utils.set_random_seed(seed)
    train = _dataset(dataset, "train", batch_size, limit, seed) if isinstance(dataset, str) else dataset
    if not isinstance(train, tf.data.Dataset):
        raise ValueError(f"dataset must be a dataset name or a tf.data.Dataset, got {type(dataset).__name__}")
    projection = BiasGridProjection(bias_update)
    start = time.perf_counter()
    with frozen_batch_norm(model):
        compile_model(model, learning_rate, steps=int(steps))
        model.fit(train.repeat(), epochs=1, steps_per_epoch=int(steps), verbose=verbose, callbacks=[projection])
        final = snap_biases_for_export(model)  # exact; BiasGridProjection raised already if it cannot
    compile_model(model, learning_rate)  # drop the train function traced with BatchNorm pinned
    return {"steps": int(steps), "bias_update": bias_update, "seconds": time.perf_counter() - start,
            "max_output_steps_moved": final["max_output_steps_moved"]}


#: training examples ``run`` re-estimates the BatchNorm statistics from after fine-tuning: in the
#: N2UQ benchmark (3 seeds, W2A2-W4A4, LSQ / LSQ+ / N2UQ, 1 epoch on 20k images) this raised the
#: test accuracy of every quantized run (docs/lsq_plus.md)
BN_REESTIMATE_EXAMPLES = 1024


def run(run_dir, dataset="fashion_mnist", model="mobile_swish", method="lsq+", weight_bits=4,
        activation_bits=4, float_epochs=3, epochs=2, batch_size=128, learning_rate=5e-4, seed=0,
        limit=None, cache_dir=None, verbose=1, callback_options=None, bias_grid_steps=0,
        bn_reestimate_examples=BN_REESTIMATE_EXAMPLES, tie_guard_examples=TIE_GUARD_EXAMPLES, **method_options):
    """The main job (see module docstring). Returns the metrics dict. ``callback_options`` go to
    the method's training callbacks (``tfq.schemes.training_callbacks``); ``bn_reestimate_examples``
    > 0 (default ``BN_REESTIMATE_EXAMPLES``) re-estimates the BatchNorm statistics from that many
    training examples after fine-tuning (``reestimate_batch_norm``; 0 keeps the trained moving
    averages); ``tie_guard_examples`` > 0 (default ``TIE_GUARD_EXAMPLES``) runs
    ``tfq.export.guard_ties`` on that many training examples after the snaps; ``bias_grid_steps`` > 0 adds ``finetune_on_bias_grid`` for that many steps after that
    (0: snap only)."""
    _check_count(bn_reestimate_examples, 0,
                 "bn_reestimate_examples must be an integer >= 0 (0: keep the trained statistics)")
    _check_count(bias_grid_steps, 0, "bias_grid_steps must be an integer >= 0 (0: no bias-grid phase)")
    _check_count(tie_guard_examples, 0, "tie_guard_examples must be an integer >= 0 (0: no tie guard)")
    os.makedirs(run_dir, exist_ok=True)
    start = time.perf_counter()
    net, cache_path = float_model(dataset, model, float_epochs, batch_size, seed=seed, limit=limit,
                                  cache_dir=cache_dir or os.path.join(run_dir, "cache"), verbose=verbose)
    float_acc = evaluate(net, dataset)
    net.save(os.path.join(run_dir, "float.h5"))
    q = quantize_model(net, method, weight_bits=weight_bits, activation_bits=activation_bits, **method_options)
    log_dir = os.path.join(run_dir, "logs")
    callbacks = schemes.training_callbacks(method, weight_bits, method_options, log_dir, callback_options)
    seconds = finetune(q, dataset, epochs, batch_size, learning_rate, seed, limit,
                       log_dir=log_dir, verbose=verbose, callbacks=callbacks)
    batch_norm = {"examples": int(bn_reestimate_examples)}
    if bn_reestimate_examples:
        batch_norm["accuracy_before"] = evaluate(q, dataset)
        images = tfq_data.load_numpy(dataset, "train", limit=int(bn_reestimate_examples))[0]
        batch_norm["layers"] = reestimate_batch_norm(q, images)
    unsnapped_acc = evaluate(q, dataset)
    guard_images = (tfq_data.load_numpy(dataset, "train", limit=int(tie_guard_examples))[0]
                    if tie_guard_examples else None)
    snap = snap_biases_for_export(q, guard_images)
    quant_acc = evaluate(q, dataset) if snap["changed"] else unsnapped_acc
    bias_grid = {"steps": int(bias_grid_steps), "accuracy_after_snap_without_phase": quant_acc}
    if bias_grid_steps and "error" not in snap:
        bias_grid.update(finetune_on_bias_grid(q, dataset, int(bias_grid_steps), batch_size=batch_size, seed=seed,
                                               limit=limit, verbose=verbose))
        quant_acc = bias_grid["accuracy_after_phase"] = evaluate(q, dataset)
    elif bias_grid_steps:
        bias_grid["skipped"] = "the model cannot be exported, so it has no int32 bias grid (see bias_snap)"
    q.save(os.path.join(run_dir, "quantized.h5"))
    metrics = {
        "dataset": dataset, "model": model, "method": method, "weight_bits": weight_bits,
        "activation_bits": activation_bits, "method_options": method_options, "float_epochs": float_epochs,
        "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
        "limit": limit, "float_checkpoint": cache_path, "float_accuracy": float_acc,
        "quantized_accuracy": quant_acc, "quantized_accuracy_before_bias_snap": unsnapped_acc,
        "callbacks": [type(c).__name__ for c in callbacks], "callback_options": callback_options or {},
        "costs": costs.summary(q),
        "batch_norm_reestimation": batch_norm, "bias_snap": snap, "bias_grid": bias_grid, "epoch_seconds": seconds,
        "total_seconds": time.perf_counter() - start, "quantizers": quantizer_parameters(q),
        "machine": machine_info(),
    }
    with open(os.path.join(run_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    return metrics
