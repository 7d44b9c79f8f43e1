"""AdaQAT bit-width learning (adaqat.txt sec. III-B, III-C) for models quantized with
``method="adaqat"``.

Keras callbacks do not see the batch, so ``AdaQAT`` wraps the model's ``train_step``: it installs
the wrapper in ``set_model`` (i.e. when ``fit`` starts) and removes it in ``on_train_end``;
``attach(model)``/``detach()`` do the same by hand (e.g. for ``train_on_batch``). Each wrapped step:

1. Probes, on the same batch and in training mode: the task loss at (ceil N_w, ceil N_a),
   (ceil N_w - 1, ceil N_a) and (ceil N_w, ceil N_a - 1); a frozen kind is not probed. The probes
   call the model directly (never the optimizer or the compiled loss and metrics), and every
   non-trainable model variable they change (BatchNorm moving statistics, quantizer init flags) is
   restored before the real step.
2. The model's own train step at (ceil N_w, ceil N_a).
3. Eq. 3: ``g_x = L(ceil N) - L(ceil N_x - 1) + lambda dL_hard/dN_x`` with
   ``L_hard = BitOPs / M`` (``tfq.costs.bitops``; M = MACs of the layers with AdaQAT weights, so
   ``L_hard = ceil N_w ceil N_a`` as in sec. III-B when every such layer reads a PACT activation),
   derivative through ceil(N) taken as 1. Eq. 4: ``N_x <- N_x - eta_x g_x``, kept in
   ``(min_bits - 1, max_bits]`` so that ceil(N_x) >= min_bits (2: activations never drop below 2 bits).
4. Oscillation (sec. III-C): each time ceil(N_x) rises from a value b, the count for b grows by
   one; when it passes ``oscillation_limit`` N_x is set to the larger value (the new ceil(N_x))
   and is no longer updated or probed (plain QAT from then on).

Under a ``tf.distribute`` strategy with several replicas the three probe losses are averaged over
the replicas (weighted by their examples: the global batch's losses), so every replica applies the
same update to its copy of N, equal to a single-device run; the probes then run unconditionally
(a forward pass inside ``tf.cond`` cannot hold the collective of ``base.gather_first_batch``)
and a frozen kind's result is discarded. See docs/distributed.md.

The state (N, the crossing counts and the frozen flags) lives in the quantizers' variables, so it is
saved with the model and in checkpoints; the callback keeps the copies of one kind equal. Per step
the callback records N, ceil(N), BitOPs, gradients and probe losses in ``history`` (and in
TensorBoard under ``log_dir``); the step's logs gain ``weight_bits``, ``activation_bits`` and
``bitops`` (so ``History`` holds them per epoch).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq import costs
from tfq.quantizers import adaqat as aq
from tfq.quantizers import base as qbase

#: N stays strictly above ``min_bits - 1`` by this margin, so that ceil(N) >= min_bits
FLOOR_MARGIN = 1e-3
HISTORY_KEYS = ("step", "weight_N", "weight_bits", "activation_N", "activation_bits", "bitops",
                "weight_gradient", "activation_gradient", "loss", "loss_weight_probe",
                "loss_activation_probe", "weight_frozen", "activation_frozen")
_STEP_VALUES = ("bitops", "weight_gradient", "activation_gradient", "loss", "loss_weight_probe",
                "loss_activation_probe")


def _check_non_negative(value, argument):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or not value >= 0:
        raise ValueError(f"{argument} must be a number >= 0, got {value!r}")
    return float(value)


def _replicas_in_sync():
    """Replicas of the ``tf.distribute`` strategy the train step runs under (1 outside one)."""
    context = tf.distribute.get_replica_context()
    return 1 if context is None else context.num_replicas_in_sync


def _compile_state(model):
    """What a compiled train function depends on besides the model's layers: ``compile`` replaces
    the optimizer and the compiled loss and metrics, so a function traced before it is stale. The
    objects themselves, compared with ``is`` (``_same_compile``): an ``id`` can be reused by a new
    object once the old one is freed."""
    return (getattr(model, "optimizer", None), getattr(model, "compiled_loss", None),
            getattr(model, "compiled_metrics", None), getattr(model, "_steps_per_execution", None))


def _same_compile(state, model):
    return all(a is b for a, b in zip(state, _compile_state(model)))


class AdaQAT(keras.callbacks.Callback):
    """Learns the shared weight and activation bit-widths N_w, N_a (see module docstring).

    Args:
      lambda_: balance of the hardware term (eq. 2). Default 0.04, measured on small_cnn
        fine-tuning with lr_weight=4e-2, lr_activation=8e-2 (docs/adaqat.md: W3/A4 within 1 point
        of float); the paper uses 0.15 (table III: 0.1, 0.15, 0.2) on ResNet20 and says to choose
        it per model (sec. IV-C).
      lr_weight, lr_activation: eta_w, eta_a of eq. 4.
      oscillation_limit: upward crossings from one bit-width allowed before freezing (10).
      min_weight_bits, min_activation_bits: lowest ceil(N) (2..8; a probe runs one bit lower).
      max_bits: highest ceil(N) (min..8).
      loss: task loss ``loss(y_true, y_pred, sample_weight)`` for the probes; default the loss given
        to ``compile`` (single-output models).
      log_dir: TensorBoard directory for the per-step scalars (``<log_dir>/adaqat``).
    """

    def __init__(self, lambda_=0.04, lr_weight=1e-3, lr_activation=5e-4, oscillation_limit=10,
                 min_weight_bits=2, min_activation_bits=2, max_bits=8, loss=None, log_dir=None):
        super().__init__()
        self.lambda_ = _check_non_negative(lambda_, "lambda_")
        self.learning_rates = {"weight": _check_non_negative(lr_weight, "lr_weight"),
                               "activation": _check_non_negative(lr_activation, "lr_activation")}
        if isinstance(oscillation_limit, bool) or not isinstance(oscillation_limit, (int, np.integer)) \
                or oscillation_limit < 0:
            raise ValueError(f"oscillation_limit must be an integer >= 0, got {oscillation_limit!r}")
        self.oscillation_limit = int(oscillation_limit)
        self.min_bits = {"weight": qbase.check_bits(min_weight_bits, "min_weight_bits"),
                         "activation": qbase.check_bits(min_activation_bits, "min_activation_bits")}
        self.max_bits = qbase.check_bits(max_bits, "max_bits", low=max(self.min_bits.values()))
        if loss is not None and not callable(loss):
            raise ValueError(f"loss must be a callable loss(y_true, y_pred, sample_weight) or None, got {loss!r}")
        self.loss = loss
        self.log_dir = log_dir
        self.history = {key: [] for key in HISTORY_KEYS}
        self._attached = None
        self._diagnostics = None
        self._writer = None
        self._traced = None   # the wrapped step's compiled train function, kept between fit calls
        self._warned_non_finite = False

    # --- installation ------------------------------------------------------------------------
    def set_model(self, model):
        super().set_model(model)
        self.attach(model)

    def on_train_end(self, logs=None):
        self.detach()
        if self._writer is not None:
            self._writer.flush()

    def attach(self, model):
        """Wrap ``model.train_step`` with the probes and bit-width update (idempotent)."""
        if self._attached is not None:
            if self._attached["model"] is model:
                return
            self.detach()
        states = aq.adaqat_states(model)
        if not states["weight"] and not states["activation"]:
            raise ValueError("AdaQAT callback: the model has no AdaQAT quantizers; quantize it with "
                             "tfq.quantize_model(model, method='adaqat')")
        for kind, group in states.items():
            for name in ("bits", "crossings", "frozen"):
                values = [np.asarray(s[name].numpy()) for s in group]
                if any(not np.array_equal(v, values[0]) for v in values[1:]):
                    raise ValueError(f"AdaQAT callback: the {kind} quantizers disagree on their shared {name} "
                                     "state; the model was edited outside the callback")
        rows = costs.layer_costs(model)
        adaptive = sum(r.macs for r in rows if isinstance(r.weight_quantizer, aq.DoReFaWeightQuantizer))
        state_ids = {id(s[name]) for group in states.values() for s in group for name in s}
        restorable = [v for v in model.non_trainable_variables if id(v) not in state_ids]
        if self._diagnostics is None:
            self._diagnostics = {key: tf.Variable(0.0, trainable=False, name=f"adaqat_{key}")
                                 for key in _STEP_VALUES}
        had_own_step = "train_step" in model.__dict__
        original = model.train_step
        compiled = _compile_state(model)
        self._attached = {"model": model, "states": states, "rows": rows,
                          "normaliser": float(adaptive or sum(r.macs for r in rows) or 1),
                          "restorable": restorable, "original": original, "had_own_step": had_own_step,
                          "own_function": model.train_function, "compiled": compiled}
        model.train_step = self._wrap(original)
        # a train function traced with the wrapped step by an earlier fit (same model, same compile)
        # is reused; anything else is rebuilt (a trace of a large model takes minutes)
        traced = self._traced
        model.train_function = traced["function"] if traced and traced["model"] is model and \
            _same_compile(traced["compiled"], model) else None
        # every value the wrapped step logs is the same on all replicas (merged metrics, all-reduced
        # probes); Keras' "auto" would sum them over MultiWorkerMirroredStrategy workers
        self._attached["reduction"] = getattr(model, "_distribute_reduction_method", None)
        if self._attached["reduction"] in (None, "auto"):
            model.distribute_reduction_method = "first"

    def detach(self):
        """Restore the model's own ``train_step``."""
        if self._attached is None:
            return
        model = self._attached["model"]
        if self._attached["had_own_step"]:
            model.train_step = self._attached["original"]
        else:
            model.__dict__.pop("train_step", None)
        model.distribute_reduction_method = self._attached["reduction"]
        if model.train_function is not None and _same_compile(self._attached["compiled"], model):
            self._traced = {"model": model, "compiled": self._attached["compiled"],
                            "function": model.train_function}
            model.train_function = self._attached["own_function"]  # the model's own, if it had one
        else:
            model.train_function = None
        self._attached = None

    # --- the wrapped step -----------------------------------------------------------------------
    def _wrap(self, original):
        def train_step(data):
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            loss, loss_w, loss_a = self._probe(x, y, sample_weight)
            logs = original(data)
            grads = self._hardware_gradients()
            for kind, probe in (("weight", loss_w), ("activation", loss_a)):
                self._update(kind, loss, probe, grads[kind])
            bitops = costs.bitops(self._attached["model"], self._attached["rows"])
            diag = self._diagnostics
            diag["bitops"].assign(bitops)
            diag["loss"].assign(loss)
            diag["loss_weight_probe"].assign(loss_w)
            diag["loss_activation_probe"].assign(loss_a)
            logs = dict(logs)
            for kind in aq.KINDS:
                group = self._attached["states"][kind]
                if group:
                    logs[f"{kind}_bits"] = aq.integer_bits(group[0]["bits"])
            logs["bitops"] = bitops
            return logs

        return train_step

    def _frozen(self, kind):
        group = self._attached["states"][kind]
        return tf.convert_to_tensor(group[0]["frozen"]) if group else tf.constant(True)

    def task_loss(self, x, y, sample_weight):
        """The task loss of one training-mode forward pass (no metric, no optimizer)."""
        model = self._attached["model"]
        y_pred = model(x, training=True)
        loss = self.loss
        if loss is None:
            loss = model.loss
            if loss is None or isinstance(loss, (dict, list, tuple)):
                raise ValueError("AdaQAT callback: compile the model with a single loss or pass loss= to the "
                                 f"callback (compiled loss: {loss!r})")
            loss = keras.losses.get(loss)
        # per-example values averaged here (SUM_OVER_BATCH_SIZE): a Loss object's own reduction is
        # refused inside a tf.distribute strategy's replica context
        per_example = loss.call if isinstance(loss, keras.losses.Loss) else loss
        value = tf.cast(per_example(y, y_pred), tf.float32)
        if sample_weight is not None:
            value = value * tf.cast(tf.reshape(sample_weight, tf.shape(value)), tf.float32)
        return tf.reduce_mean(value)

    def _loss_one_bit_less(self, kind, x, y, sample_weight):
        group = self._attached["states"][kind]
        n = tf.identity(group[0]["bits"].read_value())
        lowered = aq.integer_bits(n) - 1.0
        with tf.control_dependencies([s["bits"].assign(lowered) for s in group]):
            loss = self.task_loss(x, y, sample_weight)
        with tf.control_dependencies([loss]):
            restored = [s["bits"].assign(n) for s in group]
        with tf.control_dependencies(restored):
            return tf.identity(loss)

    def _probe(self, x, y, sample_weight):
        frozen_w, frozen_a = self._frozen("weight"), self._frozen("activation")
        restorable = self._attached["restorable"]
        replicas = _replicas_in_sync()

        def lowered(kind, frozen, loss):
            if replicas > 1:  # no forward inside tf.cond: it may hold a collective (base.gather_first_batch)
                return tf.where(frozen, loss, self._loss_one_bit_less(kind, x, y, sample_weight))
            return tf.cond(frozen, lambda: tf.identity(loss),
                           lambda: self._loss_one_bit_less(kind, x, y, sample_weight))

        def measure():
            saved = [tf.identity(v.read_value()) for v in restorable]
            with tf.control_dependencies(saved):
                loss = self.task_loss(x, y, sample_weight)
            loss_w = lowered("weight", frozen_w, loss)
            loss_a = lowered("activation", frozen_a, loss)
            with tf.control_dependencies([loss, loss_w, loss_a]):
                restored = [v.assign(value) for v, value in zip(restorable, saved)]
            with tf.control_dependencies(restored):
                return tf.identity(loss), tf.identity(loss_w), tf.identity(loss_a)

        zero = tf.constant(0.0)
        both_frozen = tf.logical_and(frozen_w, frozen_a)
        if replicas == 1:
            return tf.cond(both_frozen, lambda: (zero, zero, zero), measure)
        # under a strategy: every replica probes (even when frozen) and the three losses become
        # the global batch's (example-weighted mean over replicas), so N is updated identically
        # on every replica and as on a single device
        examples = tf.cast(tf.shape(tf.nest.flatten(x)[0])[0], tf.float32)
        losses = tf.stack(measure())
        total = tf.distribute.get_replica_context().all_reduce(
            tf.distribute.ReduceOp.SUM, tf.concat([losses * examples, examples[None]], 0))
        losses = tf.where(both_frozen, tf.zeros(3), total[:3] / total[3])
        return losses[0], losses[1], losses[2]

    def _hardware_gradients(self):
        """dL_hard/dN for each kind (summed over the copies of N), L_hard = BitOPs / M."""
        states = self._attached["states"]
        variables = {kind: [s["bits"] for s in states[kind]] for kind in aq.KINDS}
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            for group in variables.values():
                for v in group:
                    tape.watch(v)
            hard = costs.bitops(self._attached["model"], self._attached["rows"]) / self._attached["normaliser"]
        flat = variables["weight"] + variables["activation"]
        grads = tape.gradient(hard, flat, unconnected_gradients=tf.UnconnectedGradients.ZERO)
        split = len(variables["weight"])
        return {"weight": tf.add_n([tf.constant(0.0)] + grads[:split]),
                "activation": tf.add_n([tf.constant(0.0)] + grads[split:])}

    def _update(self, kind, loss, probe_loss, hardware_gradient):
        """Eq. 3-4 and the oscillation counter for one kind, assigned to every copy."""
        group = self._attached["states"][kind]
        if not group:
            return
        n = tf.identity(group[0]["bits"].read_value())
        crossings = tf.identity(group[0]["crossings"].read_value())
        frozen = tf.identity(group[0]["frozen"].read_value())
        gradient = (loss - probe_loss) + self.lambda_ * hardware_gradient
        # a NaN/Inf probe or task loss leaves this step's N as it was (on_train_batch_end warns):
        # one bad batch must not turn the saved bit-width into NaN for good
        held = tf.logical_or(frozen, tf.logical_not(tf.math.is_finite(gradient)))
        safe_gradient = tf.where(held, 0.0, gradient)
        lower = float(self.min_bits[kind] - 1) + FLOOR_MARGIN
        n_next = tf.clip_by_value(n - self.learning_rates[kind] * safe_gradient, lower, float(self.max_bits))
        bits, bits_next = aq.integer_bits(n), aq.integer_bits(n_next)
        rose = bits_next > bits
        index = tf.cast(bits, tf.int32)
        counts = crossings + tf.cast(rose, tf.int32) * tf.one_hot(index, aq.COUNTER_SIZE, dtype=tf.int32)
        freeze = tf.logical_and(rose, counts[index] > self.oscillation_limit)
        n_next = tf.where(freeze, bits_next, n_next)
        n_next = tf.where(held, n, n_next)
        counts = tf.where(held, crossings, counts)
        frozen_next = tf.logical_or(frozen, freeze)
        self._diagnostics[f"{kind}_gradient"].assign(tf.where(frozen, 0.0, gradient))
        for s in group:
            s["bits"].assign(n_next)
            s["crossings"].assign(counts)
            s["frozen"].assign(frozen_next)

    # --- logging ------------------------------------------------------------------------------
    def on_train_begin(self, logs=None):
        if self.log_dir and self._writer is None:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "adaqat"))

    def current(self):
        """The bit-width state now: ``{kind: {"N", "bits", "crossings", "frozen"}}``."""
        states = (self._attached or {}).get("states") or aq.adaqat_states(self.model)
        out = {}
        for kind, group in states.items():
            if group:
                n = float(group[0]["bits"].numpy())
                out[kind] = {"N": n, "bits": int(np.ceil(np.float32(n))),
                             "crossings": group[0]["crossings"].numpy().tolist(),
                             "frozen": bool(group[0]["frozen"].numpy())}
        return out

    def on_train_batch_end(self, batch, logs=None):
        if self._attached is None:
            return
        model = self._attached["model"]
        step = int(model.optimizer.iterations.numpy()) if model.optimizer is not None else len(self.history["step"])
        state = self.current()
        row = {"step": step}
        for kind in aq.KINDS:
            if kind in state:
                row[f"{kind}_N"] = state[kind]["N"]
                row[f"{kind}_bits"] = state[kind]["bits"]
                row[f"{kind}_frozen"] = state[kind]["frozen"]
            else:
                row[f"{kind}_N"] = row[f"{kind}_bits"] = row[f"{kind}_frozen"] = None
        row.update({key: float(self._diagnostics[key].numpy()) for key in _STEP_VALUES})
        bad = {kind: row[f"{kind}_gradient"] for kind in aq.KINDS if not np.isfinite(row[f"{kind}_gradient"])}
        if bad and not self._warned_non_finite:
            self._warned_non_finite = True
            found = ", ".join(f"{kind} {value}" for kind, value in bad.items())
            warnings.warn(f"AdaQAT: at step {step} the task or probe loss was not finite (bit-width gradient: "
                          f"{found}); N was left unchanged for that step (warned once per callback; the "
                          "gradients are in callback.history)", stacklevel=2)
        for key in HISTORY_KEYS:
            self.history[key].append(row[key])
        if self._writer is not None:
            with self._writer.as_default():
                for key in ("weight_N", "weight_bits", "activation_N", "activation_bits", "bitops",
                            "weight_gradient", "activation_gradient"):
                    if row[key] is not None:
                        tf.summary.scalar(f"adaqat/{key}", float(row[key]), step=step)
