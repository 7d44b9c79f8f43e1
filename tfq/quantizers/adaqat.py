"""AdaQAT quantizers (adaqat.txt sec. III-A): DoReFa weights and PACT activations with SAT's
improvements, at a bit-width k = ceil(N) read from a real, non-trainable variable N (sec. III-B).

Weights (DoReFa, eq. 1 and the forward/backward of sec. III-A, SAT rescaling):
``u = tanh(W) / (2 max|tanh(W)|) + 1/2`` in [0, 1], ``w_q = 2 round(u n)/n - 1`` with
``n = 2^k - 1``, then SAT's constant rescale ``r = 1/sqrt(fan_out) / std(w_q)`` (std unbiased, no
gradient; ``rescale="stddev"`` uses the authors' other option ``r = std(W)/std(w_q)``, which keeps a
pretrained layer's weight scale when fine-tuning). Rounding is straight-through; tanh and the max
are differentiated exactly. In integers: ``w = (2 round(u n) - n) * r/n``, odd codes in [-n, n] -> ``UniformGrid`` with
``bits = k + 1``, ``scale = r/n``, zero point 0 (fits an int8 container for k <= 7).

Activations (PACT with SAT's gradient): ``y = alpha round(clip(x, 0, alpha)/alpha n)/n``;
``dy/dx = 1`` on [0, alpha), else 0; ``dy/dalpha = round(x/alpha n)/n - x/alpha`` on [0, alpha),
1 on [alpha, inf), 0 below 0. Grid: ``UniformGrid(scale=alpha/n, zero_point=0, [0, n])``.
Signed variant (tensors that can be negative, e.g. swish outputs; the paper's networks only have
ReLU inputs): clip to [-alpha, alpha] on the symmetric grid ``h = 2^(k-1) - 1`` (``max(h, 1)``),
``dy/dalpha = -1`` below -alpha; grid ``[-h, h]`` with scale ``alpha/h`` (k bits).
Asymmetric signed variant (not in the paper): the symmetric grid spends half its codes below zero,
where swish (>= -0.28) and hard swish (>= -0.375) have almost nothing. Instead, a share ``r`` of the
``n = 2^k - 1`` steps lies below zero, calibrated once from the first batch
(``r = max(-x, 0) / (max x + max(-x, 0))``): ``z = min(round(r n), n - 1)`` codes below zero,
``p = n - z`` above, step ``alpha/p``, ``y = step * round(clip(x, -z step, alpha)/step)``. SAT's
gradient generalises to ``dy/dalpha = codes/p - x/alpha`` inside, 1 above alpha, ``-z/p`` below;
grid ``[-z, p]`` with scale ``alpha/p`` (k bits; ``z = 0`` is the unsigned grid). On the pretrained
mobile_swish at W8, the 4-bit symmetric grid leaves 0.26 test accuracy before any training; an
asymmetric 4-bit grid (LSQ+ configuration 4, same model) 0.79 (docs/adaqat.md).

Every quantizer stores its own copy of the bit-width state (N, upward-crossing counts per
bit-width, frozen flag) as layer variables, so the state is saved with the model (h5,
SavedModel) and in checkpoints; ``tfq.callbacks.AdaQAT`` keeps the copies of one kind equal
(one shared N_w and one N_a per model, as in the paper).
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq.quantizers import base
from tfq.quantizers.grid import UniformGrid

#: bit-widths a quantizer can run at (ceil(N) is clipped to this range)
LOWEST_BITS, HIGHEST_BITS = 1, 8
#: length of the per-bit-width crossing counter (index = bit-width)
COUNTER_SIZE = HIGHEST_BITS + 1
KINDS = ("weight", "activation")

base.register_variable_roles("weight_bits", "activation_bits", "bit_crossings", "bits_frozen", "alpha",
                             "negative_share")


def integer_bits(n):
    """k = ceil(N), clipped to [1, 8], as float32 (eq. 2: the integer bit-width)."""
    return tf.clip_by_value(tf.math.ceil(tf.cast(n, tf.float32)), float(LOWEST_BITS), float(HIGHEST_BITS))


def straight_through_bits(n):
    """ceil(N) in value, with d/dN = 1 (eq. 3 uses dL_hard/d ceil(N) as the N derivative)."""
    n = tf.cast(n, tf.float32)
    return n + tf.stop_gradient(integer_bits(n) - n)


def levels(bits):
    """n = 2^k - 1 (eq. 1)."""
    return tf.pow(2.0, bits) - 1.0


def _unbiased_std(x):
    count = tf.cast(tf.size(x), tf.float32)
    mean = tf.reduce_mean(x)
    return tf.sqrt(tf.reduce_sum(tf.square(x - mean)) / tf.maximum(count - 1.0, 1.0))


RESCALES = ("constant", "stddev", "none")


def sat_rescale(w, codes, n, rescale, fan_out):
    """SAT's factor for ``w_q = codes/n``: ``target/std(w_q)`` with target ``1/sqrt(fan_out)``
    ("constant") or ``std(W)`` ("stddev"); 1 for "none"; ``target`` alone if std(w_q) = 0."""
    if rescale == "none":
        return tf.constant(1.0)
    target = tf.math.rsqrt(float(fan_out)) if rescale == "constant" else _unbiased_std(w)
    std = _unbiased_std(codes / n)
    return target * tf.where(std > 0.0, 1.0 / tf.maximum(std, 1e-12), 1.0)


def dorefa_codes(w, n):
    """Odd integer codes ``2 round(u n) - n`` of the DoReFa weight map (no gradient)."""
    t = tf.tanh(w)
    m = tf.maximum(tf.reduce_max(tf.abs(t)), 1e-12)
    u = t / (2.0 * m) + 0.5
    return 2.0 * tf.round(u * n) - n


def dorefa_quantize(w, bits, rescale="constant", fan_out=None):
    """DoReFa weights at ``bits`` (a float tensor) with SAT's ``rescale`` (see ``sat_rescale``).

    Backward: ``dL/dW = dL/dw_out * r * 2 * du/dW`` (round is straight-through, r constant), with
    ``du_i/dt_j = d_ij/(2m) - t_i/(2m^2) dm/dt_j``, ``dm/dt_j = sign(t_j)`` shared among the
    entries reaching the max, ``dt/dW = 1 - t^2``.
    """
    n = levels(tf.cast(bits, tf.float32))

    @tf.custom_gradient
    def _dorefa(w):
        t = tf.tanh(w)
        m = tf.maximum(tf.reduce_max(tf.abs(t)), 1e-12)
        codes = dorefa_codes(w, n)
        r = tf.stop_gradient(sat_rescale(w, codes, n, rescale, fan_out))
        out = codes * (r / n)

        def grad(dy):
            g_u = dy * 2.0 * r
            at_max = tf.cast(tf.equal(tf.abs(t), tf.reduce_max(tf.abs(t))), dy.dtype)
            share = at_max / tf.reduce_sum(at_max)
            g_t = g_u / (2.0 * m) - tf.reduce_sum(g_u * t) / (2.0 * m * m) * tf.sign(t) * share
            return g_t * (1.0 - tf.square(t))

        return out, grad

    return _dorefa(w)


def pact_levels(bits, signed):
    """Positive codes of PACT: n = 2^k - 1, or h = max(2^(k-1) - 1, 1) when signed."""
    bits = tf.cast(bits, tf.float32)
    return tf.maximum(tf.pow(2.0, bits - 1.0) - 1.0, 1.0) if signed else levels(bits)


def asymmetric_codes_below_zero(bits, negative_share):
    """``z = min(round(r n), n - 1)`` codes below zero of the asymmetric grid (``n = 2^k - 1``)."""
    n = levels(tf.cast(bits, tf.float32))
    return tf.clip_by_value(tf.round(tf.cast(negative_share, tf.float32) * n), 0.0, n - 1.0)


def asymmetric_pact_quantize(x, alpha, bits, negative_share):
    """PACT on the asymmetric grid ``[-z, p]``, step ``alpha/p`` (module docstring)."""
    n = levels(tf.cast(bits, tf.float32))
    z = asymmetric_codes_below_zero(bits, negative_share)
    p = n - z

    @tf.custom_gradient
    def _pact(x, alpha):
        step = alpha / p  # the grid's scale: codes are computed as export computes them
        lower = -z * step
        codes = tf.round(tf.clip_by_value(x, lower, alpha) / step)
        y = codes * step

        def grad(dy):
            inside = tf.logical_and(x >= lower, x < alpha)
            d_alpha = tf.where(inside, codes / p - x / alpha, tf.where(x >= alpha, 1.0, -z / p))
            return dy * tf.cast(inside, dy.dtype), tf.reduce_sum(dy * d_alpha)

        return y, grad

    return _pact(x, alpha)


def pact_quantize(x, alpha, bits, signed=False):
    """PACT at ``bits`` with SAT's alpha gradient (see module docstring)."""
    n = pact_levels(bits, signed)

    @tf.custom_gradient
    def _pact(x, alpha):
        lower = -alpha if signed else 0.0
        step = alpha / n  # the grid's scale: codes are computed as export computes them
        codes = tf.round(tf.clip_by_value(x, lower, alpha) / step)
        y = codes * step

        def grad(dy):
            inside = tf.logical_and(x > lower, x < alpha) if signed else tf.logical_and(x >= 0.0, x < alpha)
            outside = tf.where(x >= alpha, 1.0, -1.0 if signed else 0.0)
            d_alpha = tf.where(inside, codes / n - x / alpha, outside)
            return dy * tf.cast(inside, dy.dtype), tf.reduce_sum(dy * d_alpha)

        return y, grad

    return _pact(x, alpha)


def fan_out_of(layer_kind, shape):
    """SAT's fan-out (output channels x kernel area): Conv2D H*W*O, DepthwiseConv2D H*W*C*M,
    Dense O. Unknown kinds fall back on the kernel rank (4: Conv2D, 2: Dense)."""
    shape = [int(d) for d in shape]
    if layer_kind == "DepthwiseConv2D":
        return int(np.prod(shape))
    if layer_kind == "Dense" or (layer_kind is None and len(shape) == 2):
        return shape[-1]
    if layer_kind in ("Conv2D", "Conv1D") or layer_kind is None:
        return int(np.prod(shape)) // shape[-2]
    raise ValueError(f"DoReFaWeightQuantizer: no fan-out rule for {layer_kind} kernels; supported: "
                     "Conv2D, Conv1D, DepthwiseConv2D, Dense")


class _AdaptiveBitsQuantizer(base.TFQQuantizer):
    """Shared part: the bit-width state variables of one kind ("weight" or "activation")."""

    kind = None
    data_dependent_init = False
    initialized_when_built = True

    def __init__(self, **config):
        config["init_bits"] = base.check_bits(config["init_bits"], "init_bits")
        super().__init__(**config)
        self.init_bits = config["init_bits"]

    @property
    def bits_role(self):
        return f"{self.kind}_bits"

    def _build_state(self, name, layer):
        return {
            self.bits_role: layer.add_weight(
                f"{name}_{self.bits_role}", shape=(), dtype=tf.float32, trainable=False,
                initializer=keras.initializers.Constant(float(self.init_bits))),
            "bit_crossings": layer.add_weight(
                f"{name}_bit_crossings", shape=(COUNTER_SIZE,), dtype=tf.int32, trainable=False,
                initializer=keras.initializers.Zeros()),
            "bits_frozen": layer.add_weight(
                f"{name}_bits_frozen", shape=(), dtype=tf.bool, trainable=False,
                initializer=keras.initializers.Constant(False)),
        }

    def bits(self, weights):
        """ceil(N) as a float32 tensor."""
        return integer_bits(weights[self.bits_role])

    def current_bits(self, weights):
        """ceil(N) as a Python int."""
        return int(keras.backend.get_value(self.bits(weights)))

    def effective_bits(self, weights):
        """ceil(N) (float32); its derivative with respect to N is 1 (straight-through)."""
        return straight_through_bits(weights[self.bits_role])

    def state(self, weights):
        """The bit-width state variables: N, crossing counts, frozen flag."""
        return {"bits": weights[self.bits_role], "crossings": weights["bit_crossings"],
                "frozen": weights["bits_frozen"]}


@base.register("dorefa")
class DoReFaWeightQuantizer(_AdaptiveBitsQuantizer):
    """DoReFa weight quantizer at ceil(N_w) bits with SAT rescaling (adaqat.txt sec. III-A).

    Args:
      init_bits: initial N_w (2..8).
      rescale: SAT's weight rescaling, "constant" (``1/sqrt(fan_out)/std(w_q)``, SAT's default),
        "stddev" (``std(W)/std(w_q)``) or "none"; a per-layer constant at inference, folded into
        the grid scale. ``True``/``False`` mean "constant"/"none".
    """

    kind = "weight"

    def __init__(self, init_bits=4, rescale="constant"):
        if isinstance(rescale, bool):
            rescale = "constant" if rescale else "none"
        base.check_choice(rescale, RESCALES, "rescale")
        super().__init__(init_bits=init_bits, rescale=rescale)
        self.rescale = rescale
        self._fan_out = None
        self._kind_name = None

    def _build_variables(self, tensor_shape, name, layer):
        shape = tf.TensorShape(tensor_shape)
        if shape.rank is None or not shape.is_fully_defined():
            raise ValueError(f"DoReFaWeightQuantizer {name!r}: needs a fully defined kernel shape, got {shape}")
        inner = getattr(layer, "layer", None)
        self._kind_name = type(inner).__name__ if inner is not None else None
        self._fan_out = fan_out_of(self._kind_name, shape.as_list())
        weights = self._build_state(name, layer)
        source = _find_weight(inner if inner is not None else layer, name)
        if source is not None:
            weights["kernel"] = source  # read by integer_grid (the SAT factor depends on it)
        return weights

    def _forward(self, inputs, training, weights):
        w = tf.convert_to_tensor(inputs)
        return dorefa_quantize(w, self.bits(weights), self.rescale, self._fan_out)

    def rescale_factor(self, kernel, weights):
        """SAT's factor r for ``kernel`` at the current bits (1 when rescale is "none")."""
        w = tf.convert_to_tensor(kernel, tf.float32)
        n = levels(self.bits(weights))
        return float(sat_rescale(w, dorefa_codes(w, n), n, self.rescale, self._fan_out))

    def integer_grid(self, weights):
        """``UniformGrid(scale=r/n, zero_point=0, [-n, n], bits=k+1)``: odd codes ``2 round(u n) - n``."""
        if "kernel" not in weights:
            raise ValueError(f"DoReFaWeightQuantizer {getattr(self, '_name', '')!r}: its kernel variable was "
                             "not found at build time, so the SAT scale cannot be computed")
        k = self.current_bits(weights)
        if k + 1 > 8:
            raise ValueError(
                f"DoReFaWeightQuantizer {self._name!r}: {k}-bit DoReFa weights need {k + 1}-bit codes "
                "(odd integers in [-(2^k-1), 2^k-1]), which do not fit an int8 container; export needs "
                "ceil(N_w) <= 7")
        n = 2 ** k - 1
        r = self.rescale_factor(weights["kernel"], weights)
        return UniformGrid(scale=np.float64(r) / n, zero_point=0, bits=k + 1, qmin=-n, qmax=n, axis=None)

    def integer_codes(self, weights):
        """The odd integer codes of the current kernel (NumPy int64), for tests and reports."""
        n = levels(self.bits(weights))
        return np.asarray(dorefa_codes(tf.convert_to_tensor(weights["kernel"], tf.float32), n)).astype(np.int64)


@base.register("pact")
class PACTQuantizer(_AdaptiveBitsQuantizer):
    """PACT activation quantizer at ceil(N_a) bits with SAT's alpha gradient (sec. III-A).

    Args:
      init_bits: initial N_a (2..8).
      alpha_init: initial clipping level (SAT: 8 before convolutions, 10 before dense layers), or
        "max": the largest ``x`` (``|x|`` when signed) of the first training (or ``tfq.calibrate``)
        batch, so tensors far from SAT's ReLU ranges (sigmoid gates, swish) start on a fitting grid.
      signed: clip to [-alpha, alpha] on a symmetric grid (for tensors that can be negative).
      asymmetric: with ``signed``, a grid whose share of steps below zero is calibrated from the
        first batch (variable role ``negative_share``) instead of half of them (module docstring).
    """

    kind = "activation"

    def __init__(self, init_bits=4, alpha_init=8.0, signed=False, asymmetric=False):
        if alpha_init != "max":
            try:
                alpha_init = float(alpha_init)
            except (TypeError, ValueError):
                alpha_init = None
            if alpha_init is None or not alpha_init > 0:
                raise ValueError(f"alpha_init must be a number > 0 or \"max\", got {alpha_init!r}")
        if not isinstance(signed, bool):
            raise ValueError(f"signed must be True or False, got {signed!r}")
        if not isinstance(asymmetric, bool):
            raise ValueError(f"asymmetric must be True or False, got {asymmetric!r}")
        if asymmetric and not signed:
            raise ValueError("asymmetric=True is for signed PACT (the unsigned grid has no codes below zero)")
        config = dict(init_bits=init_bits, alpha_init=alpha_init, signed=signed)
        if asymmetric:  # only when set, so configs saved before the option still compare equal
            config["asymmetric"] = True
        super().__init__(**config)
        self.alpha_init = alpha_init
        self.signed = signed
        self.asymmetric = asymmetric
        # "max" and the asymmetric grid's share need data: uncalibrated until a training batch
        self.data_dependent_init = self.alpha_init == "max" or asymmetric
        self.initialized_when_built = not self.data_dependent_init

    def _build_variables(self, tensor_shape, name, layer):
        start = 1.0 if self.alpha_init == "max" else self.alpha_init
        weights = {"alpha": layer.add_weight(
            f"{name}_alpha", shape=(), trainable=True,
            initializer=keras.initializers.Constant(start),
            constraint=base.PositiveConstraint(1e-3))}
        if self.asymmetric:
            weights["negative_share"] = layer.add_weight(
                f"{name}_negative_share", shape=(), trainable=False,
                initializer=keras.initializers.Constant(0.5))
        weights.update(self._build_state(name, layer))
        return weights

    def _initial_values(self, inputs, weights):
        """``alpha_init="max"``: alpha = the batch's max |x| (symmetric signed) or max x (at least
        1e-3); asymmetric: ``negative_share = max(-x, 0) / (max x + max(-x, 0))``."""
        x = tf.cast(inputs, tf.float32)
        values = {}
        if self.alpha_init == "max":
            top = tf.reduce_max(tf.abs(x)) if self.signed and not self.asymmetric else tf.reduce_max(x)
            values["alpha"] = tf.maximum(top, 1e-3)
        if self.asymmetric:
            below = tf.maximum(-tf.reduce_min(x), 0.0)
            span = tf.maximum(tf.reduce_max(x), 0.0) + below
            values["negative_share"] = tf.where(span > 0.0, below / tf.maximum(span, 1e-12), 0.5)
        return values

    def _forward(self, inputs, training, weights):
        x = tf.convert_to_tensor(inputs)
        alpha = tf.maximum(tf.convert_to_tensor(weights["alpha"]), 1e-3)
        if self.asymmetric:
            return asymmetric_pact_quantize(x, alpha, self.bits(weights), weights["negative_share"])
        return pact_quantize(x, alpha, self.bits(weights), self.signed)

    def integer_grid(self, weights):
        self._require_initialized(weights)
        k = self.current_bits(weights)
        alpha = np.float64(np.float32(max(float(keras.backend.get_value(weights["alpha"])), 1e-3)))
        if self.asymmetric:
            z = int(keras.backend.get_value(asymmetric_codes_below_zero(k, weights["negative_share"])))
            p = 2 ** k - 1 - z
            # the forward's step is float32(alpha / p): the grid holds that same value
            step = np.float64(np.float32(alpha) / np.float32(p))
            return UniformGrid(scale=step, zero_point=0, bits=k, qmin=-z, qmax=p, axis=None)
        n = max(2 ** (k - 1) - 1, 1) if self.signed else 2 ** k - 1
        return UniformGrid(scale=alpha / n, zero_point=0, bits=k,
                           qmin=-n if self.signed else 0, qmax=n, axis=None)


def _find_weight(layer, short_name):
    for w in getattr(layer, "weights", []):
        if w.name.split(":")[0].split("/")[-1] == short_name:
            return w
    return None


def adaqat_states(model):
    """``{"weight": [state dicts], "activation": [...]}`` of every AdaQAT quantizer in ``model``
    (state dict: ``bits`` (N), ``crossings``, ``frozen`` variables)."""
    from tfq import costs
    found = {kind: [] for kind in KINDS}
    seen = set()

    def add(quantizer, qvars):
        if isinstance(quantizer, _AdaptiveBitsQuantizer):
            state = quantizer.state(qvars)
            key = id(state["bits"])
            if key not in seen:
                seen.add(key)
                found[quantizer.kind].append(state)

    for layer in model.layers:
        for _, quantizer, qvars in costs.weight_quantizers(layer):
            add(quantizer, qvars)
        quantizer, qvars = costs.output_quantizer(layer)
        if quantizer is not None:
            add(quantizer, qvars)
    return found
