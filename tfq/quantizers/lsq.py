"""LSQ and LSQ+ (lsq-plus.txt): learnable scale and offset with the LSQ gradient scale.

Forward (eq. 2): ``v = (x - beta)/s``, ``x_hat = round(clip(v, n, p)) * s + beta``.
Backward (eq. 3-4, straight-through): inside ``[n, p]`` ``dx = 1``, ``ds = round(v) - v``,
``dbeta = 0``; below ``dx = 0, ds = n, dbeta = 1``; above ``dx = 0, ds = p, dbeta = 1``. The
scale and offset gradients are multiplied by ``g = 1/sqrt(N * p)`` (N = elements sharing the
scale; for activations, features per example).

Boundary convention: ``v == n`` or ``v == p`` counts as inside (as the clamp in the authors'
framework does). It matters for ReLU outputs, where many values sit exactly at ``n = 0``.

Configurations (Table 1): 1 unsigned symmetric (LSQ), 2 signed symmetric, 3 signed asymmetric,
4 unsigned asymmetric. Weights are signed symmetric (per output channel by default).

For exact integer export the offset is used as a whole number of steps: the forward uses
``beta' = -z*s`` with the integer zero point ``z = clip(round(-beta/s), n, p)`` through a
straight-through estimator (``integer_offset=True``): ``z`` inside the code range keeps real 0 on
the grid, as TFLite's int8 tensors require. Gradients of eq. 3-4 are evaluated at ``beta'`` and
passed to ``beta`` unchanged.

Scale parameterisation: ``scale_parameterization="log"`` (default) trains ``u = log(s) / k``
(variable role ``log_scale``, ``k = scale_lr_multiplier``); ``"linear"`` trains ``s`` itself (role
``scale``), as the paper does with SGD.
The forward and ``dL/ds`` (eq. 3-4 times g) are the same in both; the log form only changes how an
optimizer's step maps onto ``s``. Adam's step size does not depend on the gradient's size, so on a
linear ``s`` it moves every scale by about the learning rate per step whatever its magnitude (and
LSQ's g has no effect): a 1e-3 weight scale reaches the 1e-8 floor within a few steps of Adam(5e-4)
(``benchmarks/adam_scale.py``). On ``u`` the same step is a relative change of ``s`` by about
``k`` times the learning rate, never a collapse to 0.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq import kernels
from tfq.quantizers import base
from tfq.quantizers.grid import UniformGrid

INITS = ("lsq+", "lsq", "minmax")
SCALE_PARAMETERIZATIONS = ("log", "linear")
MIN_SCALE = 1e-8
base.register_variable_roles("log_scale")
ACTIVATION_CONFIGS = {  # Table 1: config -> (signed, learn_offset)
    1: (False, False),
    2: (True, False),
    3: (True, True),
    4: (False, True),
}


def qrange(bits, signed, narrow_range=False):
    """Integer code range (n, p): unsigned (0, 2^b-1), signed (-2^(b-1), 2^(b-1)-1); a narrow
    signed range drops the most negative code (-(2^(b-1)-1) .. 2^(b-1)-1)."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow_range), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def lsq_fake_quant(x, scale, offset, qmin, qmax, grad_scale, fused=False):
    """Eq. 2 forward with the eq. 3-4 backward; ``scale``/``offset`` broadcast against ``x``.

    ``grad_scale`` (a scalar) multiplies the scale and offset gradients (LSQ's g). ``fused=True``
    runs a per-tensor float32 quantizer through tfq's fused kernels (``tfq.kernels``: one pass
    forward, one backward; same forward bits, gradient sums equal to float rounding) when they are
    loaded; otherwise, and for per-axis scales, the TensorFlow ops below run.
    """
    if fused and kernels.fusable(x, scale, offset):
        return kernels.fake_quant(x, scale, offset, qmin, qmax, grad_scale)
    qmin = float(qmin)
    qmax = float(qmax)

    @tf.custom_gradient
    def _fq(x, s, b):
        v = (x - b) / s
        codes = tf.round(tf.clip_by_value(v, qmin, qmax))
        out = codes * s + b

        def grad(dy):
            # inside [n, p]: dx = dy, ds = round(v) - v, dbeta = 0; outside: dx = 0,
            # ds = n or p (= the clipped code), dbeta = 1. One mask serves all three.
            inside = tf.cast(tf.logical_and(v >= qmin, v <= qmax), dy.dtype)
            ds = base.reduce_to_shape(dy * (codes - v * inside), s) * grad_scale
            db = base.reduce_to_shape(dy * (1.0 - inside), b) * grad_scale
            return dy * inside, tf.reshape(ds, tf.shape(s)), tf.reshape(db, tf.shape(b))

        return out, grad

    return _fq(x, scale, offset)


def _moments(x, reduce_axes):
    mean = tf.reduce_mean(x, axis=reduce_axes)
    var = tf.reduce_mean(tf.square(x - tf.reduce_mean(x, axis=reduce_axes, keepdims=True)),
                         axis=reduce_axes)
    return mean, tf.sqrt(var)


@base.register("lsq", "lsq+")
class LSQQuantizer(base.TFQQuantizer):
    """LSQ / LSQ+ quantizer (lsq-plus.txt eq. 2-4, init sec. 3.2).

    Args:
      bits: 2..8.
      signed: signed code range (Table 1 configs 2, 3; all weights).
      learn_offset: trainable offset beta (configs 3, 4).
      per_axis: None (per tensor) or the tensor axes that get their own scale, e.g. -1 for
        Conv2D kernels (HWIO), (2, 3) for DepthwiseConv2D kernels (H, W, C, M).
      init: "lsq+" (weights: 3-sigma rule; activations: MSE-optimal, eq. 8), "lsq"
        (2 mean|v| / sqrt(p)) or "minmax" (eq. 7).
      is_weight: weights are initialised from the weight tensor on the first call (any mode);
        activations only from a training batch.
      integer_offset: snap beta to whole steps in the forward (straight-through).
      grad_scale: apply LSQ's gradient scale g.
      narrow_range: signed codes in [-(2^(b-1)-1), 2^(b-1)-1] (symmetric, as TFLite int8 weights).
      scale_parameterization: "log" (train log(s)/k: optimizer steps are relative, safe under Adam)
        or "linear" (train s, the paper's form for SGD). See the module docstring.
      scale_lr_multiplier: k of the log form: under Adam each step changes s by about k times the
        learning rate, relatively.
    """

    def __init__(self, bits=4, signed=False, learn_offset=False, per_axis=None, init="lsq+",
                 is_weight=False, integer_offset=True, grad_scale=True, narrow_range=False,
                 scale_parameterization="log", scale_lr_multiplier=1.0):
        bits = base.check_bits(bits)
        base.check_choice(init, INITS, "init")
        base.check_choice(scale_parameterization, SCALE_PARAMETERIZATIONS, "scale_parameterization")
        if isinstance(scale_lr_multiplier, bool) or not isinstance(scale_lr_multiplier, (int, float)) \
                or not scale_lr_multiplier > 0:
            raise ValueError(f"scale_lr_multiplier must be a number > 0, got {scale_lr_multiplier!r}")
        if scale_parameterization == "linear" and scale_lr_multiplier != 1.0:
            raise ValueError("scale_lr_multiplier is for scale_parameterization='log' (with 'linear' the "
                             f"optimizer's learning rate applies to s), got {scale_lr_multiplier!r}")
        if narrow_range and not signed:
            raise ValueError("narrow_range=True is for signed grids (it drops the code -2^(b-1))")
        if learn_offset and is_weight:
            raise ValueError("learn_offset=True is for activations: LSQ+ weights are symmetric")
        axes = base.normalize_axes(per_axis)
        if axes is not None and not is_weight:
            raise ValueError(
                "per_axis is only supported for weight quantizers (activations are per tensor); "
                f"got per_axis={per_axis!r} with is_weight=False")
        super().__init__(bits=bits, signed=bool(signed), learn_offset=bool(learn_offset),
                         per_axis=list(axes) if axes is not None else None, init=init,
                         is_weight=bool(is_weight), integer_offset=bool(integer_offset),
                         grad_scale=bool(grad_scale), narrow_range=bool(narrow_range),
                         scale_parameterization=scale_parameterization,
                         scale_lr_multiplier=float(scale_lr_multiplier))
        self.bits = bits
        self.signed = bool(signed)
        self.learn_offset = bool(learn_offset)
        self.per_axis = axes
        self.init = init
        self.is_weight = bool(is_weight)
        self.integer_offset = bool(integer_offset)
        self.use_grad_scale = bool(grad_scale)
        self.log_scale = scale_parameterization == "log"
        self.scale_role = "log_scale" if self.log_scale else "scale"
        self.scale_lr_multiplier = float(scale_lr_multiplier)
        self.qmin, self.qmax = qrange(bits, signed, narrow_range)
        self._init_only_when_training = not self.is_weight

    # --- variables -------------------------------------------------------------------------
    def _build_variables(self, tensor_shape, name, layer):
        self._resolve_axes(tensor_shape, name)
        if self.log_scale:
            stored = layer.add_weight(f"{name}_log_scale", shape=self._param_shape, trainable=True,
                                      initializer=keras.initializers.Constant(0.0))
        else:
            stored = layer.add_weight(f"{name}_scale", shape=self._param_shape, trainable=True,
                                      initializer=keras.initializers.Constant(1.0),
                                      constraint=base.PositiveConstraint(MIN_SCALE))
        weights = {self.scale_role: stored}
        if self.learn_offset:
            weights["offset"] = layer.add_weight(
                f"{name}_offset", shape=(), trainable=True,
                initializer=keras.initializers.Constant(0.0))
        return weights

    # --- the scale in either parameterisation ------------------------------------------------
    def scale_tensor(self, weights):
        """s as a float32 tensor (>= 1e-8), differentiable to the stored variable."""
        stored = tf.convert_to_tensor(weights[self.scale_role], tf.float32)
        if self.log_scale:
            return tf.exp(tf.maximum(stored * self.scale_lr_multiplier, math.log(MIN_SCALE)))
        return tf.maximum(stored, MIN_SCALE)

    def scale_numpy(self, weights):
        """s as a float64 NumPy array."""
        stored = np.asarray(keras.backend.get_value(weights[self.scale_role]), np.float64)
        if self.log_scale:
            return np.exp(np.maximum(stored * self.scale_lr_multiplier, math.log(MIN_SCALE)))
        return np.maximum(stored, MIN_SCALE)

    def stored_scale(self, scale):
        """The variable value that represents scale ``s`` (a tensor)."""
        scale = tf.maximum(tf.cast(scale, tf.float32), MIN_SCALE)
        return tf.math.log(scale) / self.scale_lr_multiplier if self.log_scale else scale

    def assign_scale(self, weights, scale):
        """Set s (NumPy or tensor) in the stored parameterisation."""
        variable = weights[self.scale_role]
        variable.assign(tf.reshape(self.stored_scale(scale), variable.shape))

    # --- forward ---------------------------------------------------------------------------
    def _broadcast(self, param, x):
        if self.per_axis is None:
            return param
        return tf.reshape(param, base.broadcast_shape(x.shape.rank, self.per_axis, self._param_shape))

    def _elements_per_scale(self, x):
        if self.is_weight:
            total = int(np.prod(x.shape.as_list()))
            return total // max(1, int(np.prod(self._param_shape)))
        features = x.shape[1:]
        if features.is_fully_defined():  # a constant, not three ops per step
            return int(np.prod(features.as_list()))
        return tf.cast(tf.reduce_prod(tf.shape(x)[1:]), tf.float32)

    def gradient_scale(self, x):
        """LSQ's g = 1/sqrt(N * p) (p = positive bound of the code range)."""
        if not self.use_grad_scale:
            return tf.constant(1.0)
        n = self._elements_per_scale(x)
        if isinstance(n, int):
            return tf.constant(1.0 / math.sqrt(n * max(self.qmax, 1)), tf.float32)
        return tf.math.rsqrt(tf.cast(n, tf.float32) * float(max(self.qmax, 1)))

    def effective_offset(self, scale, weights):
        """The offset used in the forward: ``s * round(beta/s)`` (STE) or beta itself."""
        if not self.learn_offset:
            return tf.zeros(())
        beta = tf.convert_to_tensor(weights["offset"])
        if self.integer_offset:
            # value -z*s with z = round(-beta/s) kept inside [n, p] (so real 0 is a code, as int8
            # tensors require); gradient to beta only (eq. 3-4 stay exact for s)
            zero_point = tf.clip_by_value(tf.round(-beta / scale), float(self.qmin), float(self.qmax))
            return beta + tf.stop_gradient(-zero_point * scale - beta)
        return beta

    def _forward(self, inputs, training, weights):
        x = tf.convert_to_tensor(inputs)
        s = self.scale_tensor(weights)
        beta = self.effective_offset(s, weights)  # activations: s is per tensor
        return lsq_fake_quant(x, self._broadcast(s, x), beta, self.qmin, self.qmax,
                              self.gradient_scale(x), fused=training is True)

    def fused_activation(self, inputs, activation, weights):
        """Eq. 2-4 of ``activation(inputs)`` in one fused kernel per direction (``tfq.kernels``),
        for a per-tensor activation quantizer in a traced training step once it is initialised
        (its data-dependent initialisation reads the activation's output, so the first,
        uncalibrated step takes the unfused path)."""
        if self.is_weight or tf.executing_eagerly() or not kernels.fuse_activations():
            return None
        with tf.init_scope():
            if not self.is_initialized(weights):
                return None
        x = tf.convert_to_tensor(inputs)
        with tf.control_dependencies([self._initialization_op(x, weights)]):  # its check only
            s = self.scale_tensor(weights)
            beta = self.effective_offset(s, weights)
            if not kernels.fusable(x, s, beta):
                return None
            return kernels.fake_quant(x, s, beta, self.qmin, self.qmax, self.gradient_scale(x),
                                      activation=activation)

    # --- initialisation (sec. 3.2, 4.3) ----------------------------------------------------
    def _reduce_axes(self, x):
        if self.per_axis is None:
            return None
        return [a for a in range(x.shape.rank) if a not in self.per_axis]

    def _initial_values(self, x, weights):
        x = tf.cast(x, tf.float32)
        if self.is_weight:
            values = {"scale": self._init_weight_scale(x)}
        else:
            values = self._init_activation(x)
        values[self.scale_role] = self.stored_scale(values.pop("scale"))
        return values

    def _init_weight_scale(self, w):
        axes = self._reduce_axes(w)
        if self.init == "lsq":
            s = 2.0 * tf.reduce_mean(tf.abs(w), axis=axes) / math.sqrt(self.qmax)
        elif self.init == "minmax":  # eq. 7 restricted to beta = 0
            s = tf.maximum(tf.reduce_max(w, axis=axes) / float(self.qmax),
                           tf.reduce_min(w, axis=axes) / float(self.qmin))
        else:  # lsq+: Gaussian 3-sigma rule, divided by 2^(b-1)
            mean, std = _moments(w, axes)
            s = tf.maximum(tf.abs(mean - 3 * std), tf.abs(mean + 3 * std)) / float(2 ** (self.bits - 1))
        return tf.maximum(s, 1e-8)

    def minmax_init(self, x):
        """Eq. 7 (asymmetric) or its symmetric restriction: (scale, offset)."""
        xmin = tf.minimum(tf.reduce_min(x), 0.0) if not self.learn_offset else tf.reduce_min(x)
        xmax = tf.reduce_max(x)
        n, p = float(self.qmin), float(self.qmax)
        if self.learn_offset:
            s = (xmax - xmin) / (p - n)
            beta = xmin - n * s
        elif self.signed:
            s = tf.maximum(xmax / p, xmin / n)
            beta = tf.zeros(())
        else:
            s = xmax / p
            beta = tf.zeros(())
        return tf.maximum(s, 1e-8), beta

    def _init_activation(self, x):
        if self.init == "lsq":
            s = tf.maximum(2.0 * tf.reduce_mean(tf.abs(x)) / math.sqrt(self.qmax), 1e-8)
            values = {"scale": s}
            if self.learn_offset:
                values["offset"] = tf.zeros(())
            return values
        s, beta = self.minmax_init(x)
        if self.init == "lsq+":
            s, beta = self._mse_search(x, s, beta)
        values = {"scale": s}
        if self.learn_offset:
            values["offset"] = beta
        return values

    def quantization_mse(self, x, scale, offset):
        """Mean squared error of the eq. 2 forward with the given parameters (offset snapped
        to whole steps when integer_offset)."""
        x = tf.reshape(tf.cast(x, tf.float32), [1, -1])
        scale = tf.reshape(scale, [-1, 1])
        offset = tf.reshape(offset, [-1, 1])
        if self.integer_offset:
            offset = scale * tf.round(offset / scale)
        codes = tf.round(tf.clip_by_value((x - offset) / scale, float(self.qmin), float(self.qmax)))
        return tf.reduce_mean(tf.square(codes * scale + offset - x), axis=1)

    def _mse_search(self, x, s0, beta0, grid=24, max_samples=65536):
        """Eq. 8 by grid search around the min-max solution (which is one of the candidates,
        so the result's MSE is never above min-max's on the same data)."""
        flat = tf.reshape(x, [-1])
        size = tf.size(flat)
        stride = tf.maximum(1, size // max_samples)
        sample = flat[::stride]
        fractions = tf.constant(np.linspace(1.0, 0.05, grid), tf.float32)
        n, p = float(self.qmin), float(self.qmax)
        if self.learn_offset:
            lo0 = beta0 + n * s0
            hi0 = beta0 + p * s0
            centre = 0.5 * (lo0 + hi0)
            # candidates shrink each end of [lo0, hi0] towards 0 (or the centre if 0 is outside)
            anchor = tf.where(tf.logical_and(lo0 <= 0.0, hi0 >= 0.0), 0.0, centre)
            his = anchor + (hi0 - anchor) * fractions
            los = anchor + (lo0 - anchor) * fractions
            hi_grid, lo_grid = tf.meshgrid(his, los)
            hi_c, lo_c = tf.reshape(hi_grid, [-1]), tf.reshape(lo_grid, [-1])
            scales = tf.maximum((hi_c - lo_c) / (p - n), 1e-8)
            offsets = lo_c - n * scales
        else:
            scales = tf.maximum(s0 * fractions, 1e-8)
            offsets = tf.zeros_like(scales)
        mse = self.quantization_mse(sample, scales, offsets)
        best = tf.argmin(mse)
        return scales[best], offsets[best]

    # --- integer grid ----------------------------------------------------------------------
    def integer_grid(self, weights):
        self._require_initialized(weights)
        scale = self.scale_numpy(weights)
        if self.learn_offset:
            beta = float(keras.backend.get_value(weights["offset"]))
            z = (np.clip(np.round(-beta / scale), self.qmin, self.qmax) if self.integer_offset
                 else -beta / scale)
            if not self.integer_offset and not np.allclose(z, np.round(z)):
                raise ValueError(
                    f"{self._name}: offset {beta} is not a whole number of steps of scale {scale}; "
                    "use integer_offset=True for exact integer export")
            zero_point = np.round(z).astype(np.int64)
        else:
            zero_point = np.zeros_like(scale, dtype=np.int64)
        return UniformGrid(scale=scale, zero_point=zero_point, bits=self.bits, qmin=self.qmin,
                           qmax=self.qmax, axis=self.per_axis)

    def scale_and_offset(self, weights):
        """(scale, effective offset) as NumPy values, for reports and TensorBoard."""
        scale = self.scale_numpy(weights)
        if not self.learn_offset:
            return scale, 0.0
        beta = float(keras.backend.get_value(weights["offset"]))
        if self.integer_offset:
            beta = float(-scale * np.clip(np.round(-beta / scale), self.qmin, self.qmax))
        return scale, beta


def activation_quantizer(bits, config=4, init="lsq+", **kwargs):
    """Table 1 configuration ``config`` (1..4) as an activation quantizer."""
    if config not in ACTIVATION_CONFIGS:
        raise ValueError(f"activation_config must be one of {sorted(ACTIVATION_CONFIGS)} "
                         f"(Table 1), got {config!r}")
    signed, learn_offset = ACTIVATION_CONFIGS[config]
    return LSQQuantizer(bits=bits, signed=signed, learn_offset=learn_offset, init=init, **kwargs)


def weight_quantizer(bits, per_axis=None, init="lsq+", **kwargs):
    """Signed symmetric weight quantizer (sec. 3.2.1). At 8 bits the range is narrow
    ([-127, 127]) by default: TFLite stores int8 weights symmetric with zero point 0, so a code
    -128 could not survive BatchNorm folding with a negative gamma."""
    kwargs.setdefault("narrow_range", bits == 8)
    return LSQQuantizer(bits=bits, signed=True, learn_offset=False, per_axis=per_axis, init=init,
                        is_weight=True, **kwargs)
