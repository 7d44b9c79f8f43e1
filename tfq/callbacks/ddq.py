"""DDQ gate schedule (ddq.txt sec. 3.1, 4.2): drives the bit-widths of mixed-precision DDQ layers from
``max_bits`` down to a weight-memory budget.

Two mechanisms act together:

* the paper's loss reweighting: the compiled loss is ``MemoryConstrainedLoss`` (built by
  ``constrained_loss``), i.e. the loss times ``(budget / zeta)^alpha`` while the footprint zeta is
  over the budget (alpha < 0, 0 within it), so the gates receive a memory gradient through the
  straight-through ``effective_bits``;
* a budget that falls linearly from the starting footprint to ``target_bits`` per weight over the
  first ``ramp`` fraction of training (precision decreases gradually, as in fig. 4), with a
  projection at ``stages`` evenly spaced points of the ramp: while the footprint is over the
  budget, the gate whose merge adds the least relative quantization error ``||Q(W) - W||^2 /
  ||W||^2`` per bit of memory saved is merged. This guarantees the budget when the gradients alone
  are too slow for a short fine-tuning. After the ramp the allocation is frozen
  (``freeze_at_target``) so the levels and weights adapt to it before evaluation.

Per-layer bits, the footprint, the budget and alpha are kept in ``history`` (one entry per epoch)
and written to TensorBoard under ``log_dir`` (``ddq/bits/<layer>``, ``ddq/...``).
"""
from __future__ import annotations

import os

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq import costs as tfq_costs
from tfq.quantizers import ddq


class DDQGateSchedule(keras.callbacks.Callback):
    """Memory-budget schedule for mixed-precision DDQ (``tfq.quantize_model(..., method="ddq")``).

    Args:
      target_bits: the budget in bits per weight of the mixed layers (the footprint of the same
        model with every mixed layer at ``target_bits``; fixed layers keep their bits).
      alpha: exponent of sec. 3.1 (<= 0; the paper uses -0.02); 0 leaves only the projection.
      ramp: fraction of the training steps over which the budget falls linearly from the starting
        footprint to the target (0: the target from the first step).
      stages: projections spread evenly over the ramp (the last one at its end).
      enforce: project onto the budget at each stage (merge gates while over it).
      freeze_at_target: after the ramp, once the target is met, keep the gates as they are so the
        levels and weights fine-tune for the final bit allocation.
      merged_logit: logit given to a gate the projection merges (negative, within the
        straight-through window so the loss can still reopen it while the gates train).
      log_dir: TensorBoard directory (None: no summaries).

    When the number of steps per epoch is unknown, the ramp and the projections go by epochs.

    Usage::

        schedule = tfq.callbacks.DDQGateSchedule(target_bits=4)
        model.compile(optimizer, loss=schedule.constrained_loss(model, loss), metrics=[...])
        model.fit(..., callbacks=[schedule])

    Resuming: the schedule's position (step, starting footprint, budget, freeze) is a checkpoint
    dependency of the model, so ``keras.callbacks.BackupAndRestore`` (best listed after the schedule, which
    then has done its epoch-end work when the backup is taken) or a TF-format weights checkpoint restores
    it, and a fit resumed at epoch k > 0 continues the ramp.
    ``history`` holds only the epochs of the current ``fit``.
    """

    def __init__(self, target_bits, alpha=-0.02, ramp=0.5, stages=4, enforce=True, freeze_at_target=True,
                 merged_logit=-0.05, log_dir=None, verbose=0):
        super().__init__()
        if isinstance(target_bits, bool) or not isinstance(target_bits, (int, float)) or not 1 <= target_bits <= 8:
            raise ValueError(f"target_bits must be a number of bits per weight in [1, 8], got {target_bits!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha > 0:
            raise ValueError(f"alpha must be a number <= 0 (sec. 3.1), got {alpha!r}")
        if isinstance(ramp, bool) or not isinstance(ramp, (int, float)) or not 0 <= ramp <= 1:
            raise ValueError(f"ramp must be a fraction of training in [0, 1], got {ramp!r}")
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive integer, got {stages!r}")
        if isinstance(merged_logit, bool) or not isinstance(merged_logit, (int, float)) \
                or not -1 <= merged_logit < 0:
            raise ValueError(f"merged_logit must be in [-1, 0) (merging, inside the STE window), got {merged_logit!r}")
        self.target_bits = float(target_bits)
        self.ramp = float(ramp)
        self.stages = stages
        self.enforce = bool(enforce)
        self.freeze_at_target = bool(freeze_at_target)
        self.merged_logit = float(merged_logit)
        self.log_dir = log_dir
        self.verbose = verbose
        self.alpha = tf.Variable(float(alpha), trainable=False, dtype=tf.float32, name="ddq_alpha")
        self.budget = tf.Variable(0.0, trainable=False, dtype=tf.float32, name="ddq_budget")
        # the schedule's position, checkpointed with the model (see set_model) so that a fit resumed
        # by BackupAndRestore continues the ramp where the interrupted one stopped
        self._state = tf.Module(name="ddq_gate_schedule")
        self._state.budget = self.budget
        self._state.step = tf.Variable(0, trainable=False, dtype=tf.int64, name="ddq_step")
        self._state.start = tf.Variable(0.0, trainable=False, dtype=tf.float64, name="ddq_start")
        self._state.frozen = tf.Variable(False, trainable=False, name="ddq_frozen")
        self._state.started = tf.Variable(False, trainable=False, name="ddq_started")
        self.history = []
        self.frozen = False
        self._writer = None

    # --- set-up ------------------------------------------------------------------------------
    def constrained_loss(self, model, loss):
        """``MemoryConstrainedLoss`` bound to ``model`` and to this schedule's budget and alpha."""
        self._mixed_rows(model)  # fail early on a model without mixed DDQ layers
        self.budget.assign(tfq_costs.weight_memory(model))
        return ddq.MemoryConstrainedLoss(loss, model, budget=self.budget, alpha=self.alpha)

    @staticmethod
    def _mixed_rows(model):
        rows = [r for r in tfq_costs.layer_costs(model) if ddq.is_mixed(r.weight_quantizer)]
        if not rows:
            raise ValueError("DDQGateSchedule: the model has no mixed-precision DDQ layers; quantize it with "
                             "tfq.quantize_model(model, method='ddq', mode='mixed', ...)")
        return rows

    def set_model(self, model):
        super().set_model(model)
        # a checkpoint dependency of the model (not a layer or weight: h5 files are unchanged), so
        # BackupAndRestore and TF-format checkpoints of the model save and restore the position
        model._track_trackable(self._state, name="tfq_ddq_gate_schedule", overwrite=True)

    def on_train_begin(self, logs=None):
        model = self.model
        self._rows = self._mixed_rows(model)
        self._all_rows = tfq_costs.layer_costs(model)
        if float(self.alpha.numpy()) != 0 and not (isinstance(model.loss, ddq.MemoryConstrainedLoss)
                                                  and model.loss.budget is self.budget):
            raise ValueError("DDQGateSchedule with alpha != 0 needs the model compiled with "
                             "loss=schedule.constrained_loss(model, loss) (sec. 3.1 loss reweighting); "
                             "use alpha=0 for the projection-only schedule")
        self._layers = {r.name: self._kernel_and_quantizer(model, r.name) for r in self._rows}
        self._target = ddq.target_memory(model, self.target_bits, self._all_rows)
        # a position restored before this point (load_weights, BackupAndRestore listed first); a
        # fit that starts at epoch > 0 continues from it (see _resume)
        self._restored = self._read_state()
        self._start = max(self.memory(), self._target)
        epochs = self.params.get("epochs") or 1
        steps = self.params.get("steps")
        # the ramp in steps when an epoch's length is known, else in epochs
        self._by_steps = bool(steps)
        length = self.ramp * epochs * (steps if steps else 1)
        self._ramp_length = length
        self._stage_points = sorted({max(1, int(round(length * k / self.stages))) for k in range(1, self.stages + 1)})
        self._step = 0
        self._epoch = 0
        self.frozen = False
        self._frozen_values = None
        if self.log_dir:
            self._writer = tf.summary.create_file_writer(os.path.join(self.log_dir, "ddq"))
        self._write_state(step=0, start=self._start, frozen=False, budget=self._budget_at(0))
        self._resumed = False
        if self.ramp == 0:
            self._finish_ramp()

    # --- resuming ------------------------------------------------------------------------------
    def _read_state(self):
        s = self._state
        return {"step": int(s.step.numpy()), "start": float(s.start.numpy()), "frozen": bool(s.frozen.numpy()),
                "started": bool(s.started.numpy()), "budget": float(s.budget.numpy())}

    def _write_state(self, step, start, frozen, budget):
        s = self._state
        s.step.assign(step)
        s.start.assign(start)
        s.frozen.assign(frozen)
        s.budget.assign(budget)
        s.started.assign(True)

    def on_epoch_begin(self, epoch, logs=None):
        if epoch > 0 and not self._resumed and self._step == 0:
            self._resume(epoch)
        self._resumed = True

    def _resume(self, epoch):
        """A fit starting at ``epoch`` > 0 continues the checkpointed run's position (step, start,
        budget, freeze): restored after ``on_train_begin`` (BackupAndRestore listed after this
        callback) or before it (``load_weights``, BackupAndRestore listed first)."""
        state = self._read_state()
        if state["step"] == 0:  # nothing restored since on_train_begin
            state = self._restored
            if not state["started"] or state["step"] == 0:
                return  # no saved position: the fresh start stands
            self._write_state(state["step"], state["start"], state["frozen"], state["budget"])
        self._step, self._start, self._epoch = state["step"], state["start"], epoch
        self.frozen = state["frozen"]  # the restored gates are then the frozen ones
        self._frozen_values = ([(qvars["gates"], qvars["gates"].numpy()) for _, _, qvars in self._layers.values()]
                               if self.frozen else None)

    @staticmethod
    def _kernel_and_quantizer(model, name):
        kernel, quantizer, qvars = tfq_costs.weight_quantizers(model.get_layer(name))[-1]
        return kernel, quantizer, qvars

    # --- budget ------------------------------------------------------------------------------
    def _budget_at(self, position):
        done = 1.0 if self._ramp_length == 0 else min(1.0, position / self._ramp_length)
        return self._start + (self._target - self._start) * done

    def memory(self):
        """Current weight footprint in bits."""
        return float(tfq_costs.weight_memory(self.model, self._all_rows))

    def layer_bits(self):
        return {r.name: float(tfq_costs.weight_bits(r)) for r in self._rows}

    def _advance(self, position):
        """Move the budget to ``position`` (steps or epochs); project at stage points."""
        if self.frozen:
            return
        self.budget.assign(self._budget_at(position))
        if self.ramp > 0 and position in self._stage_points:
            if self.enforce:
                self._project(float(self.budget.numpy()))
            if position == self._stage_points[-1]:
                self._finish_ramp()

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        self._state.step.assign(self._step)
        if self._frozen_values is not None:
            for var, value in self._frozen_values:
                var.assign(value)
        elif self._by_steps:
            self._advance(self._step)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if not self._by_steps:
            self._advance(self._epoch)
        self._record(epoch)

    def _finish_ramp(self):
        if self.enforce:
            self._project(self._target)
        if self.freeze_at_target and self.memory() <= self._target + 1e-6:
            self._frozen_values = [(qvars["gates"], qvars["gates"].numpy()) for _, _, qvars in self._layers.values()]
            self.frozen = True
            self._state.frozen.assign(True)

    # --- projection onto the budget -----------------------------------------------------------
    def _relative_error(self, name, gates=None):
        kernel, quantizer, qvars = self._layers[name]
        values = dict(qvars)
        if gates is not None:
            values["gates"] = tf.constant(gates)
        w = tf.convert_to_tensor(kernel)
        wq = quantizer._forward(w, False, values)
        return float(tf.reduce_sum(tf.square(wq - w)) / tf.maximum(tf.reduce_sum(tf.square(w)), 1e-30))

    def _candidate(self, row):
        """(score, gate index) of merging ``row``'s lowest kept gate, or None at min_bits."""
        _, quantizer, qvars = self._layers[row.name]
        gates = qvars["gates"].numpy()
        kept = np.flatnonzero(gates >= 0)
        if kept.size == 0:
            return None
        index = kept[np.argmin(gates[kept])]
        trial = gates.copy()
        trial[index] = self.merged_logit
        increase = self._relative_error(row.name, trial) - self._relative_error(row.name)
        return max(increase, 0.0) / row.params, index

    def _project(self, budget):
        """Greedy merges until the footprint is within ``budget`` (bits)."""
        memory = self.memory()
        if memory <= budget + 1e-6:
            return
        candidates = {r.name: (r, self._candidate(r)) for r in self._rows}
        merged = []
        while memory > budget + 1e-6:
            live = [(c[0], name) for name, (r, c) in candidates.items() if c is not None]
            if not live:
                break  # every mixed layer is at min_bits: the budget cannot be met
            _, name = min(live)
            row, (_, index) = candidates[name]
            merged.append((row, index, self._set_gate(name, index, self.merged_logit)))
            memory -= row.params
            candidates[name] = (row, self._candidate(row))
        # a large layer's merge can overshoot: reopen, latest first, the merges the slack still holds
        for row, index, previous in reversed(merged[:-1]):
            if memory + row.params <= budget + 1e-6:
                self._set_gate(row.name, index, previous)
                memory += row.params
        if self.verbose:
            print(f"DDQGateSchedule: projected to {memory / self._params():.3f} bits/weight "
                  f"(budget {budget / self._params():.3f})")

    def _set_gate(self, name, index, logit):
        """Sets one gate logit; returns its previous value."""
        gates = self._layers[name][2]["gates"]
        value = gates.numpy()
        previous = float(value[index])
        value[index] = logit
        gates.assign(value)
        return previous

    def _params(self):
        return float(sum(r.params for r in self._all_rows))

    # --- logging -------------------------------------------------------------------------------
    def _record(self, epoch):
        bits = self.layer_bits()
        params = self._params()
        entry = {"epoch": epoch, "step": self._step, "bits": bits,
                 "memory_bits": self.memory(), "budget_bits": float(self.budget.numpy()),
                 "target_bits": self._target, "alpha": float(self.alpha.numpy())}
        entry["bits_per_weight"] = entry["memory_bits"] / params
        self.history.append(entry)
        if self._writer is not None:
            with self._writer.as_default():
                for name, b in bits.items():
                    tf.summary.scalar(f"ddq/bits/{name}", b, step=epoch)
                tf.summary.scalar("ddq/bits_per_weight", entry["bits_per_weight"], step=epoch)
                tf.summary.scalar("ddq/budget_bits_per_weight", entry["budget_bits"] / params, step=epoch)
                tf.summary.scalar("ddq/alpha", entry["alpha"], step=epoch)
            self._writer.flush()
        if self.verbose:
            print(f"DDQGateSchedule epoch {epoch}: {entry['bits_per_weight']:.3f} bits/weight, "
                  f"bits {bits}")

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
