"""Training on the integer model's int32 bias grid (export issue 3).

The integer model adds ``round(b' / (s_in * s_w'))`` to each int32 accumulator, ``b'`` the
BatchNorm-folded bias and ``s_in * s_w'`` the accumulator step (input step times folded weight
step, per output channel). ``tfq.export.snap_biases`` moves the Keras biases onto that grid once,
after training; at 2 bits the accumulator step can exceed many output steps and the snap alone
costs accuracy. ``BiasGridProjection`` keeps the biases on the grid during a short fine-tuning
phase so that the rest of the network adapts to the rounding.

The grid is only meaningful when each BatchNorm runs in inference mode (its folded form is then
exact up to the bias rounding). Keras' switch for that, ``trainable=False``, acts differently on
the two kinds of BatchNormalization a tfq model holds: inside a tfmot ``QuantizeWrapperV2`` (a BN
whose output is quantized) it freezes the moving statistics only, because the wrapper copied gamma
and beta into its own trainable weights when it was built; on an unwrapped BN (one feeding a ReLU)
it freezes gamma and beta too. ``frozen_batch_norm(model)`` therefore leaves ``trainable`` alone
and pins each BN's training argument to False inside the block: every BN normalises with its
moving statistics, which stay unchanged, while gamma and beta of every trainable BN keep training.
Gamma scales the folded weight step (the grid moves with it); beta is the bias, and the callback
decides what happens to the biases:

* ``"straight_through"`` (default): a float copy of every bias accumulates the optimizer's
  updates and the model holds its projection, ``b = snap(b_float)`` — the straight-through rule
  for rounding (d snap(b)/db = 1), so updates smaller than half a grid step are not lost;
* ``"projected"``: the updated bias itself is projected (updates smaller than half a step are
  undone, so a bias moves only when the grid under it moves);
* ``"frozen"``: the optimizer's bias updates are discarded; each bias stays at its starting value,
  projected onto the grid as the grid moves with the weight scales and gamma.
"""
from __future__ import annotations

import contextlib

import numpy as np
import tf_keras as keras

from tfq import costs

BIAS_UPDATES = ("straight_through", "projected", "frozen")


def _inner_layers(model):
    """Every layer of ``model`` (nested models descended into), tfmot wrappers unwrapped."""
    for layer in model.layers:
        if hasattr(layer, "layers") and not hasattr(layer, "quantize_config"):
            yield from _inner_layers(layer)  # nested model
        else:
            yield costs.inner_layer(layer)


def batch_norm_layers(model):
    """The (inner) BatchNormalization layers of ``model``, wrapped or not."""
    return [layer for layer in _inner_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]


def _inference_mode(training=None):
    return False


def in_inference_mode(layer):
    """Whether BatchNormalization ``layer`` normalises with its moving statistics in every call."""
    return not layer.trainable or layer.__dict__.get("_get_training_value") is _inference_mode


@contextlib.contextmanager
def frozen_batch_norm(model):
    """Every BatchNormalization of ``model`` in inference mode (moving statistics used and frozen)
    inside the block, gamma/beta still trainable (see the module docstring); ``trainable`` flags
    are left as they are (and checked on exit). Compile (or recompile) the model inside the block:
    a train function traced before it runs BatchNorm in training mode."""
    layers = batch_norm_layers(model)
    pinned = [layer for layer in layers if "_get_training_value" not in layer.__dict__]
    flags = [layer.trainable for layer in layers]
    try:
        for layer in pinned:
            # BatchNormalization.call asks this method for its mode; the instance attribute shadows it
            layer._get_training_value = _inference_mode
        yield layers
    finally:
        for layer in pinned:
            del layer._get_training_value
        for layer, flag in zip(layers, flags):
            layer.trainable = flag


def bias_variables(model):
    """Variables ``snap_biases`` may move: BatchNorm betas and weighted layers' biases."""
    variables = []
    for inner in _inner_layers(model):
        if isinstance(inner, keras.layers.BatchNormalization):
            if inner.center and inner.beta is not None:
                variables.append(inner.beta)
        elif getattr(inner, "use_bias", False) and getattr(inner, "bias", None) is not None:
            variables.append(inner.bias)
    return variables


class BiasGridProjection(keras.callbacks.Callback):
    """Projects the folded biases onto their int32 accumulator grid (``tfq.export.snap_biases``)
    when training starts and after every train batch; see the module docstring for
    ``bias_update``. Requires every BatchNormalization in inference mode (``frozen_batch_norm``);
    ``history`` holds, per batch, the largest bias move in output steps."""

    def __init__(self, bias_update="straight_through"):
        super().__init__()
        if bias_update not in BIAS_UPDATES:
            raise ValueError(f"bias_update must be one of {', '.join(BIAS_UPDATES)}, got {bias_update!r}")
        self.bias_update = bias_update
        self.history = []

    def _snap(self):
        from tfq.export.tflite import snap_biases
        rows = snap_biases(self.model)
        moved = [r["max_output_steps"] for r in rows if r.get("max_output_steps") is not None]
        self.history.append(max(moved) if moved else 0.0)
        self._snapped = [v.numpy() for v in self._variables]

    def on_train_begin(self, logs=None):
        training_bn = [layer.name for layer in batch_norm_layers(self.model) if not in_inference_mode(layer)]
        if training_bn:
            raise ValueError(
                f"BiasGridProjection needs every BatchNormalization in inference mode, but {training_bn} "
                "run in training mode (normalising by batch statistics, unlike the folded integer "
                "layer); train inside tfq.callbacks.bias_grid.frozen_batch_norm(model) or use "
                "tfq.train.finetune_on_bias_grid")
        self._variables = bias_variables(self.model)
        self._float = [v.numpy().astype(np.float64) for v in self._variables]
        self.history = []
        self._snap()

    def on_train_batch_end(self, batch, logs=None):
        for i, variable in enumerate(self._variables):
            if self.bias_update == "straight_through":
                self._float[i] = self._float[i] + (variable.numpy() - self._snapped[i])
            elif self.bias_update == "projected":
                continue
            variable.assign(self._float[i].astype(np.float32))
        self._snap()
