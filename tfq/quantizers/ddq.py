"""DDQ: differentiable dynamic quantization (ddq.txt), reconstructed as SPEC.md "DDQ" settles it.

Levels (eq. 4): ``2^max_bits`` levels ``q = x_min + (x_max - x_min) R(q~)``, where R clips the
trainable ``q~`` and rounds it onto the ``level_bits`` grid (straight-through), so every level is
an integer code of that grid:

* weights: a symmetric grid ``q = c * m / K``, ``c`` in ``[-K, K]``, ``K = 2^(level_bits-1) - 1``
  (127: int8 codes with zero point 0, as TFLite weights need), ``m`` = ``range`` (max |W| per
  tensor or output channel, from the data; learnable with ``learn_range``), ``q~`` in [-1, 1];
* activations: an inner ``level_bits`` LSQ+ quantizer (lsq-plus.txt config 4: unsigned, integer
  zero point z) first puts the input on the grid ``(c - z) * s``, ``c`` in ``[0, 2^level_bits - 1]``;
  the levels are codes of that same grid (``q~`` in [0, 1]), so an integer model maps input code to
  level code by a table (``CodebookGrid.code_table``).

Bit-width (sec. 2.3): gates ``g_i = H(g^_i)`` (Heaviside forward, identity backward clipped to
``|g^| <= 1``), ``U = kron_i(g_i I + (1 - g_i) 1)``. The logits are sorted in descending order
(gradients pass back through the permutation) so merging gates act on the least significant bits
and U stays block diagonal; the first ``min_bits`` factors are always identities. The effective
levels ``U^T q / Z_U`` are block means, computed without U: reshape q to ``[2] * max_bits`` and
replace, axis by axis, the values by their mean over that axis where the gate merges
(``block_means``). Block means are snapped back onto the level grid (straight-through) so the
effective levels stay integer codes (the paper's eq. 3 leaves them as real means; export needs
codes). Effective bits = ``max_bits`` - (number of merging gates).

Forward (eq. 3): nearest effective level, ties to the lower level. Backward (one
``tf.custom_gradient``, ``codebook_quantize``): ``dx = dL/dx_q`` inside [min level, max level],
else 0; ``dL/dq_k`` = sum of the (corrected) incoming gradients of the values assigned to level k
(eq. 8; the 1/Z_U of eq. 8 comes from differentiating the block means); gradient correction
(eq. 9): the quantization parameters receive ``dL/dx_q + lambda (x_q - x)``, x the plain one.

Memory constraint (sec. 3.1): ``memory_loss_factor`` = ``(zeta_target / zeta)^alpha`` when the
footprint ``zeta = sum_l params_l * bits_l`` (``tfq.costs.weight_memory``; eq. 6 prints ``2^s``,
but storage grows linearly with bits) exceeds the budget, else 1. ``MemoryConstrainedLoss`` wraps a
Keras loss with it for ``model.compile``; ``tfq.callbacks.DDQGateSchedule`` drives the budget.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq import costs as tfq_costs
from tfq.quantizers import base, lsq
from tfq.quantizers.grid import CodebookGrid, UniformGrid

base.register_variable_roles("levels", "gates", "range")

#: gate logits start positive (all bits kept); staggered so the least significant bit is the
#: closest to merging (sec. 4.2 initialises them at 1e-8)
DEFAULT_GATE_INIT = 0.1


# --- building blocks ---------------------------------------------------------------------------
@tf.custom_gradient
def heaviside(logits):
    """``g = H(g^)`` (1 for ``g^ >= 0``) with the clipped straight-through backward
    ``dg/dg^ = 1[|g^| <= 1]`` (sec. 3.2, implementation details)."""
    gates = tf.cast(logits >= 0.0, logits.dtype)

    def grad(dy):
        return dy * tf.cast(tf.abs(logits) <= 1.0, dy.dtype)

    return gates, grad


def round_ste(x):
    """Round half to even forward, identity backward."""
    return x + tf.stop_gradient(tf.round(x) - x)


def ordered_gates(logits, min_bits=0):
    """Gate values per level-index axis, most significant first: ``min_bits`` ones, then
    ``H`` of the logits sorted in descending order (so merges act on the low bits)."""
    logits = tf.convert_to_tensor(logits, tf.float32)
    gates = heaviside(tf.sort(logits, direction="DESCENDING"))
    return tf.concat([tf.ones([min_bits], tf.float32), gates], axis=0)


def block_means(levels, gates):
    """``U^T q / Z_U`` for ``U = kron_i(g_i I + (1 - g_i) 1_2x2)`` without building U.

    ``levels``: ``[..., 2^b]``; ``gates``: ``[b]`` (first = most significant index bit). Viewing the
    last axis as ``[2] * b``, along each of those axes the values become
    ``g * q + (1 - g) * mean(q over that axis)`` (exact for binary gates, linear in g for the
    straight-through gradient). Axis i is handled as ``[rows, 2^i, 2, 2^(b-1-i)]`` (low-rank
    tensors are much faster than a rank b+1 reshape).
    """
    levels = tf.convert_to_tensor(levels)
    bits = int(gates.shape[0])
    n = 2 ** bits
    if levels.shape[-1] != n:
        raise ValueError(f"block_means: {levels.shape[-1]} levels do not match {bits} gates")
    shape = tf.shape(levels)
    x = tf.reshape(levels, [-1, n])
    for i in range(bits):
        g = gates[i]
        pairs = tf.reshape(x, [-1, 2 ** i, 2, 2 ** (bits - 1 - i)])
        pairs = g * pairs + (1.0 - g) * tf.reduce_mean(pairs, axis=2, keepdims=True)
        x = tf.reshape(pairs, [-1, n])
    return tf.reshape(x, shape)


#: bits of an int64 left for the sum of fixed-point terms (one bit stays free for the sign)
_FIXED_POINT_BITS = 62


def _per_row_sum(values, index, rows, width):
    """``out[r, k] = sum of values[r, j] where index[r, j] == k`` (``[rows, width]``), the same
    bits on every call.

    ``tf.math.bincount`` with float weights sums in an order that varies from call to call on a
    multi-threaded CPU (partial sums per worker; op determinism does not change it), which made
    DDQ training irreproducible. The terms are therefore summed as int64 fixed-point numbers
    (integer addition does not depend on the order): each is rounded to a multiple of
    ``2^-e``, with ``e`` chosen so that ``count * max|values| * 2^e`` fits 62 bits. A term moves by
    at most ``2^-e / 2 <= 2 * count * max|values| * 2^-62`` (``count``: number of values), about
    ``2^-40 max|values|`` for a million values, below float32's rounding of the terms themselves.
    """
    values = tf.reshape(values, [-1])
    flat = tf.reshape(index + tf.range(rows)[:, None] * width, [-1])
    peak = tf.reduce_max(tf.abs(values))
    count_bits = tf.math.ceil(tf.math.log(tf.cast(tf.size(values), tf.float32) + 1.0) / math.log(2.0))
    peak_bits = tf.math.ceil(tf.math.log(tf.maximum(peak, 1e-30)) / math.log(2.0))
    exponent = tf.clip_by_value(_FIXED_POINT_BITS - count_bits - peak_bits, -100.0, 100.0)
    scale = tf.pow(2.0, exponent)
    fixed = tf.cast(tf.round(values * scale), tf.int64)
    sums = tf.math.bincount(flat, weights=fixed, minlength=rows * width, maxlength=rows * width,
                            dtype=tf.int64)
    return tf.reshape(tf.cast(sums, values.dtype) / scale, [rows, width])


def codebook_quantize(x, codes, scale, zero=0.0, correction=0.0, input_codes=None):
    """Eq. 3 forward and eq. 8-9 backward on a per-row codebook.

    Args:
      x: ``[C, N]`` values (row = channel; one row per tensor).
      codes: ``[C, n]`` level codes, sorted ascending (integer-valued floats).
      scale: ``[C, 1]`` real step: a level is ``(code - zero) * scale``.
      zero: ``[C, 1]`` or scalar integer zero point (no gradient).
      correction: lambda of eq. 9.
      input_codes: ``(low, high)`` when x is already on the grid (activations): ``x / scale + zero``
        is rounded to an integer code in [low, high] and mapped through a per-code table, so the
        nearest-level decision is exact integer arithmetic (and cheaper than a search per value).

    Returns ``(c - zero) * scale`` with ``c`` the nearest code (ties to the lower one). Gradients:
    x gets ``dy`` inside [min level, max level]; codes get ``scale * sum_{i in S_k} (dy_i +
    lambda (x_q_i - x_i))`` (eq. 8-9); scale gets ``sum (dy + lambda (x_q - x)) (c - zero)``.
    """
    zero = tf.stop_gradient(tf.cast(zero, tf.float32))

    @tf.custom_gradient
    def _quantize(x, codes, scale):
        rows, n = tf.shape(codes)[0], tf.shape(codes)[1]
        v = x / scale + zero
        mids = 0.5 * (codes[:, :-1] + codes[:, 1:])
        if input_codes is None:
            # number of midpoints strictly below v: v on a midpoint takes the lower level
            idx = tf.searchsorted(mids, v, side="left", out_type=tf.int32)
            chosen = tf.gather(codes, idx, batch_dims=1)
        else:
            low, high = input_codes
            v = tf.round(v)
            grid = tf.broadcast_to(tf.range(low, high + 1, dtype=tf.float32)[None, :], [rows, high - low + 1])
            table = tf.searchsorted(mids, grid, side="left", out_type=tf.int32)  # input code -> level
            position = tf.cast(tf.clip_by_value(v, float(low), float(high)) - low, tf.int32)
            chosen = tf.gather(tf.gather(codes, table, batch_dims=1), position, batch_dims=1)
        out = (chosen - zero) * scale

        def grad(dy):
            inside = tf.logical_and(v >= codes[:, :1], v <= codes[:, -1:])
            dx = dy * tf.cast(inside, dy.dtype)
            upstream = dy + correction * (out - x) if correction else dy
            if input_codes is None:
                per_level = _per_row_sum(upstream, idx, rows, n)
            else:
                per_code = _per_row_sum(upstream, position, rows, high - low + 1)
                per_level = _per_row_sum(per_code, table, rows, n)
            d_scale = tf.reduce_sum(upstream * (chosen - zero), axis=1, keepdims=True)
            return dx, per_level * scale, tf.reshape(d_scale, tf.shape(scale))

        return out, grad

    return _quantize(x, codes, scale)


# --- the quantizer -----------------------------------------------------------------------------
class LevelConstraint(keras.constraints.Constraint):
    """Keeps the level parameters q~ inside R's clipping interval."""

    def __init__(self, low, high):
        self.low, self.high = float(low), float(high)

    def __call__(self, w):
        return tf.clip_by_value(w, self.low, self.high)

    def get_config(self):
        return {"low": self.low, "high": self.high}


keras.utils.register_keras_serializable(package="tfq")(LevelConstraint)


@base.register("ddq")
class DDQQuantizer(base.TFQQuantizer):
    """DDQ quantizer (ddq.txt eq. 3-4, 8-9, sec. 2.3): learned levels and learned bit-width.

    Args:
      max_bits: bits at the start (``2^max_bits`` levels; all gates keep their bit).
      min_bits: bits that never merge (sec. 4.2: layers stay between 2 bits and the maximum).
      level_bits: b_q of eq. 4, the grid every level lies on (8: int8 codes); >= max_bits.
      per_axis: weights only: tensor axes with their own levels and range (Conv2D (3,),
        DepthwiseConv2D (2, 3)); gates are always per tensor (one bit-width per layer).
      grad_correction: lambda of eq. 9 (0 disables the correction).
      is_weight: weight quantizer (symmetric grid, data range) or activation (inner LSQ+ grid).
      fixed: gates are not trainable (DDQ(fix) of Tables 2-3): the bit-width stays max_bits.
      learn_range: weights: the range m is trainable (its gradient is eq. 4's dq/dm).
      gate_init: the largest initial gate logit (all positive, staggered down to
        gate_init / number of gates for the least significant bit).
    """

    def __init__(self, max_bits=8, min_bits=2, level_bits=8, per_axis=None, grad_correction=0.0,
                 is_weight=False, fixed=False, learn_range=False, gate_init=DEFAULT_GATE_INIT):
        level_bits = base.check_bits(level_bits, "level_bits")
        max_bits = base.check_bits(max_bits, "max_bits", low=1, high=level_bits)
        min_bits = base.check_bits(min_bits, "min_bits", low=1, high=max_bits)
        if isinstance(grad_correction, bool) or not isinstance(grad_correction, (int, float)) \
                or not grad_correction >= 0:
            raise ValueError(f"grad_correction (lambda of eq. 9) must be a number >= 0, got {grad_correction!r}")
        if isinstance(gate_init, bool) or not isinstance(gate_init, (int, float)) or not 0 < gate_init <= 1:
            raise ValueError(f"gate_init must be in (0, 1] (positive: all bits kept; <= 1: inside the "
                             f"straight-through window), got {gate_init!r}")
        axes = base.normalize_axes(per_axis)
        if axes is not None and not is_weight:
            raise ValueError("per_axis is only supported for weight quantizers (activations are per tensor); "
                             f"got per_axis={per_axis!r} with is_weight=False")
        if learn_range and not is_weight:
            raise ValueError("learn_range is for weights: an activation's range is its inner LSQ+ grid, "
                             "which is always learned")
        super().__init__(max_bits=max_bits, min_bits=min_bits, level_bits=level_bits,
                         per_axis=list(axes) if axes is not None else None,
                         grad_correction=float(grad_correction), is_weight=bool(is_weight), fixed=bool(fixed),
                         learn_range=bool(learn_range), gate_init=float(gate_init))
        self.max_bits, self.min_bits, self.level_bits = max_bits, min_bits, level_bits
        self.per_axis = axes
        self.grad_correction = float(grad_correction)
        self.is_weight = bool(is_weight)
        self.fixed = bool(fixed)
        self.learn_range = bool(learn_range)
        self.gate_init = float(gate_init)
        self.num_levels = 2 ** max_bits
        self.num_gates = max_bits - min_bits
        # code range of the level grid: symmetric [-K, K] (weights) or [0, K] (activations)
        if self.is_weight:
            self.code_max = 2 ** (level_bits - 1) - 1
            self.code_min = -self.code_max
        else:
            self.code_min, self.code_max = 0, 2 ** level_bits - 1
        self._init_only_when_training = not self.is_weight
        if not self.is_weight:
            # the input grid (lsq-plus.txt config 4 at level_bits), and the max_bits LSQ+ quantizer
            # whose MSE-optimal range initialises it (so at init DDQ equals a max_bits LSQ+ grid)
            self._input_quantizer = lsq.LSQQuantizer(bits=level_bits, signed=False, learn_offset=True,
                                                     init="lsq+", scale_parameterization="linear")
            self._init_quantizer = lsq.LSQQuantizer(bits=max(max_bits, 2), signed=False, learn_offset=True,
                                                    init="lsq+")

    # --- variables -------------------------------------------------------------------------
    def _build_variables(self, tensor_shape, name, layer):
        self._resolve_axes(tensor_shape, name)
        self._channels = int(np.prod(self._param_shape)) if self._param_shape else 1
        low = -1.0 if self.is_weight else 0.0
        uniform = np.linspace(low, 1.0, self.num_levels, dtype=np.float32)
        weights = {
            "levels": layer.add_weight(
                f"{name}_levels", shape=self._param_shape + (self.num_levels,), trainable=True,
                initializer=keras.initializers.Constant(np.broadcast_to(
                    uniform, self._param_shape + (self.num_levels,)).tolist()),
                constraint=LevelConstraint(low, 1.0)),
            "gates": layer.add_weight(
                f"{name}_gates", shape=(self.num_gates,), trainable=not self.fixed,
                initializer=keras.initializers.Constant(self.initial_gate_logits().tolist())),
        }
        if self.is_weight:
            weights["range"] = layer.add_weight(
                f"{name}_range", shape=self._param_shape, trainable=self.learn_range,
                initializer=keras.initializers.Constant(1.0), constraint=base.PositiveConstraint(1e-8))
        else:
            weights.update(self._input_quantizer._build_variables(tensor_shape, name, layer))
        return weights

    def initial_gate_logits(self):
        """Positive logits, largest first: gate_init * (G - i) / G."""
        g = self.num_gates
        return np.array([self.gate_init * (g - i) / g for i in range(g)], np.float32)

    # --- levels and gates ------------------------------------------------------------------
    def gate_values(self, weights):
        """Ordered gates, most significant index bit first (``[max_bits]``, straight-through)."""
        return ordered_gates(weights["gates"], self.min_bits)

    def effective_bits(self, weights):
        """``max_bits`` - merging gates, differentiable w.r.t. the gate logits (clipped STE)."""
        return float(self.min_bits) + tf.reduce_sum(heaviside(tf.convert_to_tensor(weights["gates"], tf.float32)))

    def raw_codes(self, weights):
        """Eq. 4's ``R(q~)`` as grid codes, ``[channels, 2^max_bits]`` (straight-through)."""
        q = tf.reshape(tf.convert_to_tensor(weights["levels"], tf.float32), [self._channels, self.num_levels])
        low = -1.0 if self.is_weight else 0.0
        return round_ste(float(self.code_max) * tf.clip_by_value(q, low, 1.0))

    def effective_codes(self, weights):
        """``U^T q / Z_U`` snapped to the grid (straight-through), sorted ascending:
        ``[channels, 2^max_bits]``, each block's level repeated over the block."""
        merged = round_ste(block_means(self.raw_codes(weights), self.gate_values(weights)))
        order = tf.argsort(tf.stop_gradient(merged), axis=-1, stable=True)
        return tf.gather(merged, order, batch_dims=1)

    def level_codes(self, weights):
        """NumPy ``[channels, 2^bits]``: one sorted code per block (the distinct levels export
        stores, coincident blocks repeated), bits = the current effective bits."""
        gates = self.gate_values(weights).numpy()
        kept = int(round(gates.sum()))
        merged = tf.round(block_means(self.raw_codes(weights), tf.constant(gates))).numpy()
        blocks = merged[:, ::2 ** (self.max_bits - kept)]
        return np.sort(blocks, axis=-1).astype(np.int64), kept

    def weight_scale(self, weights):
        """Weights: grid step ``m / K`` per channel, ``[channels, 1]``."""
        m = tf.maximum(tf.convert_to_tensor(weights["range"], tf.float32), 1e-8)
        return tf.reshape(m / float(self.code_max), [self._channels, 1])

    def input_scale_and_zero(self, weights):
        """Activations: (s, z) of the inner grid, z read from the offset its forward uses."""
        s = tf.maximum(tf.convert_to_tensor(weights["scale"], tf.float32), 1e-8)
        z = tf.round(-self._input_quantizer.effective_offset(s, weights) / s)
        return s, z

    # --- forward ---------------------------------------------------------------------------
    def _to_rows(self, x):
        """``x`` as ``[channels, N]`` (channel axes first) and the inverse mapping."""
        if self.per_axis is None:
            shape = tf.shape(x)
            return tf.reshape(x, [1, -1]), lambda y: tf.reshape(y, shape)
        rest = [a for a in range(self._rank) if a not in self.per_axis]
        perm = list(self.per_axis) + rest
        moved = tf.transpose(x, perm)
        moved_shape = tf.shape(moved)
        inverse = np.argsort(perm).tolist()
        return (tf.reshape(moved, [self._channels, -1]),
                lambda y: tf.transpose(tf.reshape(y, moved_shape), inverse))

    def _forward(self, inputs, training, weights):
        x = tf.cast(tf.convert_to_tensor(inputs), tf.float32)
        codes = self.effective_codes(weights)
        if self.is_weight:
            rows, back = self._to_rows(x)
            # eq. 9's weight term does not depend on the batch: under a tf.distribute strategy each
            # replica adds its share, as the strategy sums the replicas' gradients
            context = tf.distribute.get_replica_context()
            share = 1.0 / (context.num_replicas_in_sync if context is not None else 1)
            out = codebook_quantize(rows, codes, self.weight_scale(weights), 0.0, self.grad_correction * share)
            return back(out)
        x8 = self._input_quantizer._forward(x, training, weights)
        s, z = self.input_scale_and_zero(weights)
        rows, back = self._to_rows(x8)
        # the range is learned by the inner LSQ+ grid (eq. 3-4 of lsq-plus.txt) through dx
        out = codebook_quantize(rows, codes, tf.reshape(tf.stop_gradient(s), [1, 1]), z,
                                self.grad_correction, input_codes=(self.code_min, self.code_max))
        return back(out)

    # --- initialisation ----------------------------------------------------------------------
    def _initial_values(self, x, weights):
        x = tf.cast(x, tf.float32)
        if not self.is_weight:
            # max_bits LSQ+ range (MSE-optimal, eq. 8 of lsq-plus.txt) on the level_bits grid
            values = self._init_quantizer._init_activation(x)
            offset = self._init_quantizer.effective_offset(values["scale"], values)  # whole steps
            ratio = (2.0 ** self._init_quantizer.bits - 1) / float(self.code_max)
            return {"scale": values["scale"] * ratio, "offset": offset}
        rows, _ = self._to_rows(x)
        m = tf.maximum(tf.reduce_max(tf.abs(rows), axis=1), 1e-8)
        mean = tf.reduce_mean(rows, axis=1)
        std = tf.sqrt(tf.reduce_mean(tf.square(rows - mean[:, None]), axis=1))
        # uniform levels on [-r, r], r = the LSQ+ 3-sigma clip (lsq-plus.txt sec. 3.2), at most m
        r = tf.minimum(m, tf.maximum(tf.abs(mean - 3 * std), tf.abs(mean + 3 * std)))
        fraction = tf.where(r > 0, r / m, tf.ones_like(m))
        uniform = tf.constant(np.linspace(-1.0, 1.0, self.num_levels), tf.float32)
        levels = fraction[:, None] * uniform[None, :]
        return {"range": tf.reshape(m, self._param_shape),
                "levels": tf.reshape(levels, self._param_shape + (self.num_levels,))}

    # --- integer grid ----------------------------------------------------------------------
    def integer_grid(self, weights):
        """``CodebookGrid``: the sorted block codes (int8) and the grid step. Weights: zero point 0,
        scale ``m / K`` (shape of the per-axis parameter), levels ``[2^bits]`` per tensor or
        ``[channels, 2^bits]`` (channels flattened row-major). Activations: the inner grid as
        ``input_grid`` and its zero point, codes shifted like its int8 container."""
        self._require_initialized(weights)
        codes, bits = self.level_codes(weights)
        if self.is_weight:
            scale = self.weight_scale(weights).numpy().astype(np.float64).reshape(self._param_shape)
            levels = codes if self.per_axis is not None else codes[0]
            return CodebookGrid(levels_int8=levels, scale=scale, bits=bits,
                                axis=self.per_axis)
        s, z = self.input_scale_and_zero(weights)
        s = float(s.numpy())
        z = int(z.numpy())
        input_grid = UniformGrid(scale=s, zero_point=z, bits=self.level_bits, qmin=self.code_min,
                                 qmax=self.code_max)
        shift = z - int(input_grid.to_int8_container()[1])
        return CodebookGrid(levels_int8=codes[0] - shift, scale=s, bits=bits, zero_point=z - shift,
                            input_grid=input_grid)


def weight_quantizer(max_bits=8, per_axis=None, **kwargs):
    """DDQ weight quantizer (symmetric int8 level grid)."""
    return DDQQuantizer(max_bits=max_bits, per_axis=per_axis, is_weight=True, **kwargs)


def activation_quantizer(max_bits=8, **kwargs):
    """DDQ activation quantizer (levels on an inner LSQ+ 8-bit grid)."""
    return DDQQuantizer(max_bits=max_bits, is_weight=False, **kwargs)


# --- memory constraint (sec. 3.1) -------------------------------------------------------------
def is_mixed(quantizer):
    """A DDQ quantizer whose gates train (its bit-width counts toward the budget)."""
    return isinstance(quantizer, DDQQuantizer) and not quantizer.fixed


def target_memory(model, target_bits, costs=None):
    """``zeta(b^1..b^L)`` in bits: every mixed DDQ layer at ``target_bits``, every other layer at
    its current bits (first/last layers at 8, float layers at 32)."""
    rows = tfq_costs.layer_costs(model) if costs is None else costs
    total = 0.0
    for row in rows:
        bits = target_bits if is_mixed(row.weight_quantizer) else float(tfq_costs.weight_bits(row))
        total += row.params * bits
    return total


def memory_loss_factor(model, budget, alpha, costs=None):
    """Sec. 3.1: ``(budget / zeta)^alpha`` if ``zeta > budget`` else 1, with ``zeta`` =
    ``tfq.costs.weight_memory(model)`` (bits; differentiable w.r.t. the gates). ``budget`` (bits)
    and ``alpha`` (<= 0) may be tf.Variables that a schedule changes."""
    zeta = tfq_costs.weight_memory(model, costs)
    budget = tf.cast(budget, tf.float32)
    alpha = tf.cast(alpha, tf.float32)
    over = tf.cast(zeta > budget, tf.float32)
    return tf.pow(budget / zeta, alpha * over)


@keras.utils.register_keras_serializable(package="tfq")
class MemoryConstrainedLoss(keras.losses.Loss):
    """``loss * memory_loss_factor(model, budget, alpha)`` (sec. 3.1, the loss of eq. 7).

    Use it in ``model.compile(loss=...)``; ``budget`` is in bits (e.g. ``target_memory(model, 4)``)
    or a variable a ``DDQGateSchedule`` moves. A loss restored from a saved model has no model
    to measure: it raises until it is re-created.
    """

    def __init__(self, loss, model=None, budget=None, alpha=-0.02, name="memory_constrained", **kwargs):
        kwargs.pop("reduction", None)
        self.base_loss = keras.losses.get(loss)
        super().__init__(reduction=getattr(self.base_loss, "reduction", keras.losses.Reduction.AUTO),
                         name=name, **kwargs)
        if isinstance(alpha, (int, float)) and alpha > 0:
            raise ValueError(f"alpha must be <= 0 (sec. 3.1: negative penalises memory), got {alpha!r}")
        self.model, self.budget, self.alpha = model, budget, alpha
        self._costs = None

    def factor(self):
        if self.model is None or self.budget is None:
            raise ValueError("MemoryConstrainedLoss needs the model and a budget (bits): "
                             "MemoryConstrainedLoss(loss, model, budget=target_memory(model, bits))")
        if self._costs is None:
            self._costs = tfq_costs.layer_costs(self.model)
        return memory_loss_factor(self.model, self.budget, self.alpha, self._costs)

    def call(self, y_true, y_pred):
        per_example = (self.base_loss.call(y_true, y_pred) if isinstance(self.base_loss, keras.losses.Loss)
                       else self.base_loss(y_true, y_pred))
        return per_example * self.factor()

    def get_config(self):
        value = lambda v: float(keras.backend.get_value(v)) if v is not None else None  # noqa: E731
        return {"loss": keras.losses.serialize(self.base_loss), "budget": value(self.budget),
                "alpha": value(self.alpha), "name": self.name}
