"""N2UQ (n2uq.txt): learnable input thresholds, uniform output levels, G-STE backward.

Activations (sec. 3.2.1-3.2.2). ``2^b - 1`` segments start at ``s`` with lengths ``a_i`` (used
as ``max(a_i, 1e-3)``); segment ends ``d_0 = s``, ``d_i = s + sum_{j<=i} a_j``. The input is
scaled, ``x' = beta1 * x``, and the output level is the number of thresholds below it, the
thresholds being the segment midpoints ``T_k = d_{k-1} + a_k/2`` (eq. 12); the output is
``beta2 * k * 2/(2^b - 1)``. The backward (G-STE, eq. 11 and 13) differentiates the
piecewise-linear surrogate ``E(x') = interval * ((x' - d_{i-1})/a_i + i - 1)`` for ``x'`` in
segment ``i``: ``dE/dx' = interval/a_i`` inside ``(d_0, d_n]``, 0 outside; ``dE/ds = -interval/a_i``;
``dE/da_i = -interval (x' - d_{i-1})/a_i^2`` inside segment ``i`` and ``-interval/a_j`` inside
a later segment ``j``; beta1 and beta2 get the chain rule through ``x'`` and the output.
Segments are left-open, ``(d_{i-1}, d_i]``, and thresholds strict (``x' > T_k``), as the official
code compares with ``>`` (eq. 11/12 print the other ends closed; only values exactly on an end
differ, e.g. ReLU zeros at ``s = 0`` get no gradient).

Integer export: the thresholds act on the int8 code of the pre-activation, so the quantizer
first puts its input on an 8-bit unsigned grid with an integer zero point (an LSQ+ fake-quant,
lsq-plus.txt config 4, with its own ``<tensor>_input_scale``/``<tensor>_input_offset``, MSE
initialised from the first training batch) and then thresholds the *integer code* ``u``:
``x' > T_k  <=>  u > m_k`` with ``m_k = floor(T_k / (beta1 * s8)) + z8``. The forward reads the
output level from a 256-entry table built from the ``m_k``; ``integer_grid`` builds its
``ThresholdGrid`` from the same ``m_k`` (thresholds half a step above code ``m_k``), so
``code_table()`` equals the Keras forward exactly, ties included.

Initialisation: ``init="paper"`` is sec. 4.1 (``s = 0``, ``a_i = 2/(2^b - 1)``, beta1 = beta2 = 1).
``init="data"`` (not in the paper) starts the quantizer equal to a b-bit LSQ+ config-4 quantizer
fitted to the first training batch, which needs a constant integer output zero point (the output
levels stay uniform: ``beta2 * interval * (k - z)``); it suits short fine-tuning of pretrained
models whose activations are not centred like the paper's (e.g. swish outputs), and it is the
scheme's default: from the paper's start, a tensor far narrower than [0, 2] maps to one level
(a constant network), and one far wider is clipped, which moves the statistics the following
BatchNorm layers' moving averages hold (docs/n2uq.md).

Learning rate of the quantizer parameters (sec. 4.1: 1/10 of the weights'). Each of ``s``,
``a_i``, beta1, beta2 is stored as ``p / param_lr_scale`` and used as ``param_lr_scale * stored``
with an identity gradient to the stored variable. The stored variable receives ``dL/dp``, so any
optimizer whose step is proportional to its learning rate (SGD, momentum, Adam, RMSprop,
Adagrad) moves ``p`` by ``param_lr_scale`` times the step it would take on ``p`` itself. (Plain
gradient scaling would work for SGD only: Adam's step is invariant to the gradient's scale.)
Decoupled weight decay, if any, acts on the stored value. ``parameters(weights)`` returns the
effective values.

Weights (sec. 3.2.3, official ``HardQuantizeConv``): per output channel
``S = ((2^b - 1)/2^(b-1)) mean|W_c|``, ``W' = clip(W/S, -1, 1)``,
``c = round((W' + 1)(2^b - 1)/2)`` in ``[0, 2^b - 1]``, ``W_q = S (2c/(2^b - 1) - 1)``; ``S`` gets no
gradient and the gradient passes straight through ``W/S`` without a clip mask. The official
code feeds the unscaled levels ``W_q/S`` to the convolution (and BatchNorm absorbs ``S``), so
there ``dL/dW = dL/d(W_q/S) / S``; with ``S`` kept in the forward that same gradient reads
``dL/dW = dL/dW_q``. Integer form: ``W_q = (S/(2^b - 1)) * o`` with the odd code
``o = 2c - (2^b - 1)`` in ``[-(2^b - 1), 2^b - 1]``, zero point 0: a ``UniformGrid`` of
``bits = b + 1`` (the odd codes span ``2^(b+1) - 1`` integers), which fits int8 for ``b <= 7``;
so N2UQ weights take 2..7 bits (8-bit layers use LSQ+ weights in the scheme). Costs count
``b`` bits (``effective_bits``). Apply the grid to the quantized kernel (``round(W_q/scale)``):
rounding the float kernel onto the grid would produce even codes N2UQ never uses.
``S`` is recomputed from the kernel on every training call and stored in ``<tensor>_scale``;
inference uses the stored value, so the inference forward and the grid always agree.
"""
from __future__ import annotations

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq.quantizers import base, lsq
from tfq.quantizers.grid import ThresholdGrid, UniformGrid

#: segments shorter than this are used at this length and get no gradient (official code)
MIN_LENGTH = 1e-3
#: bits of the uniform grid the activation thresholds act on
INPUT_BITS = 8
INPUT_QMIN, INPUT_QMAX = 0, 2 ** INPUT_BITS - 1
#: N2UQ weights need bits + 1 grid bits (odd codes); int8 holds b <= 7
MAX_WEIGHT_BITS = 7
#: activation initialisations (see N2UQActivationQuantizer)
INITS = ("paper", "data")

base.register_variable_roles("start", "lengths", "beta1", "beta2", "zero_point")


def _interval(bits):
    """Output step before beta2: levels {0, 2/(2^b-1), ..., 2} (sec. 3.2.2)."""
    return 2.0 / (2 ** bits - 1)


def threshold_codes(start, lengths, beta1, input_scale, input_zero_point):
    """``m_k = floor(T_k / (beta1 * s8)) + z8`` (clipped to ``[-1, 255]``): for an integer input
    code ``u`` of the 8-bit grid, ``beta1 * (u - z8) * s8 > T_k  <=>  u > m_k``. ``T_k`` are the
    segment midpoints of eq. 12. Every argument is a float32 tensor (no gradient)."""
    lower_ends = start + tf.cumsum(lengths, exclusive=True)  # d_0 .. d_{n-1}
    midpoints = lower_ends + lengths / 2.0                   # T_k = d_{k-1} + a_k / 2
    codes = tf.floor(midpoints / (beta1 * input_scale)) + input_zero_point
    return tf.clip_by_value(codes, INPUT_QMIN - 1.0, float(INPUT_QMAX))


def level_table(codes_of_thresholds):
    """Output level (eq. 12) for each input code ``u`` in ``0..255``: ``#{k : u > m_k}``."""
    u = tf.range(INPUT_QMIN, INPUT_QMAX + 1, dtype=tf.float32)
    return tf.reduce_sum(tf.cast(u[:, None] > codes_of_thresholds[None, :], tf.float32), axis=1)


def gste_quantize(x, levels, start, lengths, beta1, beta2, bits, output_zero_point=0.0):
    """Output ``beta2 * interval * (levels - output_zero_point)`` with the G-STE backward (eq. 11, 13).

    ``x`` is the (8-bit) input, ``levels`` its forward level (eq. 12, computed by the caller on
    integer codes; no gradient). ``lengths`` are the effective ``max(a_i, 1e-3)``. Returns the
    output; gradients go to ``x``, ``start``, ``lengths``, ``beta1`` and ``beta2``.
    ``output_zero_point`` (a constant, 0 in the paper) shifts the uniform output levels.
    """
    interval = _interval(bits)
    n = 2 ** bits - 1
    levels = tf.stop_gradient(levels) - tf.stop_gradient(tf.cast(output_zero_point, tf.float32))

    @tf.custom_gradient
    def _quantize(x, start, lengths, beta1, beta2):
        step = beta2 * interval
        out = levels * step

        def grad(dy):
            scaled = tf.reshape(x * beta1, [1, -1])                       # x' = beta1 * x
            ends = tf.concat([tf.reshape(start, [1]), start + tf.cumsum(lengths)], 0)  # d_0..d_n
            # number of ends strictly below x': 0 -> x' <= d_0, i -> segment i, n+1 -> x' > d_n
            position = tf.reshape(tf.searchsorted(ends[None, :], scaled, side="left"), [-1])
            inside = tf.logical_and(position >= 1, position <= n)
            segment = tf.clip_by_value(position, 1, n) - 1                 # 0-based segment
            length = tf.gather(lengths, segment)
            left = tf.gather(ends, segment)                                # d_{i-1}
            g = tf.reshape(dy, [-1]) * beta2
            slope = tf.where(inside, interval / length, 0.0)                # eq. 11
            d_scaled = g * slope                                           # dL/dx'
            flat_x = tf.reshape(x, [-1])
            d_x = tf.reshape(d_scaled * beta1, tf.shape(x))
            d_beta1 = tf.reduce_sum(d_scaled * flat_x)
            d_start = -tf.reduce_sum(d_scaled)
            # eq. 13: own segment -interval (x' - d_{i-1}) / a_i^2; later segments -interval / a_j
            own = tf.where(inside, -g * interval * (scaled[0] - left) / tf.square(length), 0.0)
            own_sum = tf.math.unsorted_segment_sum(own, segment, n)
            per_segment = tf.math.unsorted_segment_sum(d_scaled, segment, n)
            later = tf.reduce_sum(per_segment) - tf.cumsum(per_segment)   # sum over j > i
            d_lengths = own_sum - later
            d_beta2 = tf.reduce_sum(dy * levels) * interval   # output / beta2
            return d_x, d_start, d_lengths, d_beta1, d_beta2

        return out, grad

    return _quantize(x, start, lengths, beta1, beta2)


def entropy_preserving_quantize(w, scale, bits):
    """Sec. 3.2.3 forward ``S (2c/(2^b-1) - 1)``, ``c = round((clip(W/S, -1, 1) + 1)(2^b-1)/2)``,
    with ``dL/dW = dL/dW_q`` (straight through ``W/S``, ``S`` constant, no clip mask).
    ``scale`` broadcasts against ``w``."""
    n = float(2 ** bits - 1)
    scale = tf.stop_gradient(scale)

    @tf.custom_gradient
    def _quantize(w):
        codes = tf.round((tf.clip_by_value(w / scale, -1.0, 1.0) + 1.0) * (n / 2.0))
        out = (2.0 * codes - n) * (scale / n)   # odd code times the grid step S/(2^b-1)

        def grad(dy):
            return dy

        return out, grad

    return _quantize(w)


def _lr_scaled(variable, factor):
    """Value ``factor * variable`` with gradient ``dL/dvalue`` to the variable (see module doc)."""
    raw = tf.convert_to_tensor(variable)
    if factor == 1.0:
        return raw
    return tf.stop_gradient(raw * factor) + (raw - tf.stop_gradient(raw))


@base.register("n2uq", "n2uq_activation")
class N2UQActivationQuantizer(base.TFQQuantizer):
    """N2UQ activation quantizer (n2uq.txt eq. 11-13) on an 8-bit input grid.

    Args:
      bits: output bits, 2..8 (``2^bits - 1`` segments).
      param_lr_scale: learning-rate factor of start, lengths, beta1, beta2 (> 0; paper 0.1).
      input_init: initialisation of the 8-bit input grid: "lsq+" (MSE, eq. 8 of lsq-plus.txt),
        "lsq" or "minmax".
      init: "paper" (sec. 4.1: start 0, a_i = 2/(2^b-1), beta1 = beta2 = 1, output zero point 0:
        uniform rounding on [0, 2]) or "data" (not in the paper): from the first training batch,
        fit a b-bit LSQ+ config-4 quantizer (scale s, offset -z s, integer z; lsq-plus.txt eq. 8)
        and start equal to it: beta1 = interval/s, beta2 = s/interval, start = -z interval and an
        output zero point z (a constant; output ``beta2 interval (k - z)``). This keeps a
        pretrained model's activation scale and negative values (swish), which BatchNorm's moving
        statistics rely on during short fine-tuning.

    Variables (``<tensor>_<role>``): ``start``, ``lengths`` (``2^b - 1``), ``beta1``, ``beta2``
    (stored divided by ``param_lr_scale``), ``zero_point`` (output, not trainable),
    ``input_scale``, ``input_offset``, ``initialized``.
    """

    def __init__(self, bits=2, param_lr_scale=0.1, input_init="lsq+", init="paper"):
        bits = base.check_bits(bits)
        if isinstance(param_lr_scale, bool) or not isinstance(param_lr_scale, (int, float)) \
                or not 0.0 < float(param_lr_scale) <= 1e3:
            raise ValueError(f"param_lr_scale must be a number in (0, 1000], got {param_lr_scale!r}")
        base.check_choice(input_init, lsq.INITS, "input_init")
        base.check_choice(init, INITS, "init")
        super().__init__(bits=bits, param_lr_scale=float(param_lr_scale), input_init=input_init, init=init)
        self.init = init
        self.bits = bits
        self.param_lr_scale = float(param_lr_scale)
        self.num_segments = 2 ** bits - 1
        self.interval = _interval(bits)
        self._input = lsq.activation_quantizer(INPUT_BITS, config=4, init=input_init,
                                                  scale_parameterization="linear")
        # init="data": the MSE-optimal b-bit LSQ+ quantizer (config 4) the quantizer starts as
        self._range = lsq.activation_quantizer(bits, config=4, init="lsq+")

    # --- variables -------------------------------------------------------------------------
    def _build_variables(self, tensor_shape, name, layer):
        inner = self._input._build_variables(tensor_shape, f"{name}_input", layer)
        k = self.param_lr_scale

        def stored(role, shape, value, constraint=None):
            return layer.add_weight(f"{name}_{role}", shape=shape, trainable=True,
                                    initializer=keras.initializers.Constant(value / k),
                                    constraint=constraint)

        return {
            "input_scale": inner["scale"],
            "input_offset": inner["offset"],
            "start": stored("start", (), 0.0),
            "lengths": stored("lengths", (self.num_segments,), self.interval),
            "beta1": stored("beta1", (), 1.0, base.PositiveConstraint(1e-6 / k)),
            "beta2": stored("beta2", (), 1.0, base.PositiveConstraint(1e-6 / k)),
            "zero_point": layer.add_weight(f"{name}_zero_point", shape=(), trainable=False,
                                           initializer=keras.initializers.Constant(0.0)),
        }

    @staticmethod
    def _inner_weights(weights):
        return {"scale": weights["input_scale"], "offset": weights["input_offset"],
                "initialized": weights["initialized"]}

    def _parameters(self, weights):
        """Effective (start, lengths, beta1, beta2) tensors, differentiable to the variables."""
        k = self.param_lr_scale
        lengths = _lr_scaled(weights["lengths"], k)
        lengths = tf.where(lengths > MIN_LENGTH, lengths, MIN_LENGTH)  # no gradient below 1e-3
        return (_lr_scaled(weights["start"], k), lengths, _lr_scaled(weights["beta1"], k),
                _lr_scaled(weights["beta2"], k))

    def _input_grid_tensors(self, weights):
        """(scale, offset used in the forward, integer zero point) of the 8-bit input grid."""
        scale = tf.maximum(tf.convert_to_tensor(weights["input_scale"]), 1e-8)
        offset = self._input.effective_offset(scale, self._inner_weights(weights))
        zero_point = -tf.round(tf.stop_gradient(offset) / tf.stop_gradient(scale))
        return scale, offset, zero_point

    def _threshold_codes(self, weights, scale, zero_point):
        start, lengths, beta1, _ = (tf.stop_gradient(p) for p in self._parameters(weights))
        return threshold_codes(start, lengths, beta1, tf.stop_gradient(scale), zero_point)

    # --- forward ---------------------------------------------------------------------------
    def _forward(self, inputs, training, weights):
        x = tf.cast(tf.convert_to_tensor(inputs), tf.float32)
        scale, offset, zero_point = self._input_grid_tensors(weights)
        x8 = lsq.lsq_fake_quant(x, scale, offset, INPUT_QMIN, INPUT_QMAX, self._input.gradient_scale(x),
                                fused=training is True)
        codes = tf.clip_by_value(tf.round(tf.stop_gradient(x8) / tf.stop_gradient(scale)) + zero_point,
                                 INPUT_QMIN, INPUT_QMAX)
        table = level_table(self._threshold_codes(weights, scale, zero_point))
        levels = tf.gather(table, tf.cast(codes, tf.int32))
        start, lengths, beta1, beta2 = self._parameters(weights)
        return gste_quantize(x8, levels, start, lengths, beta1, beta2, self.bits, weights["zero_point"])

    # --- initialisation: the 8-bit input grid; with init="data" also beta1, beta2 -----------
    def _initial_values(self, x, weights):
        x = tf.cast(x, tf.float32)
        values = {f"input_{key}": value for key, value in self._input._init_activation(x).items()}
        if self.init == "data":
            fit = self._range._init_activation(x)              # LSQ+ (s, beta): levels beta + k s
            step = fit["scale"]
            zero_point = tf.round(-fit["offset"] / step)      # integer zero point, beta' = -z s
            k = self.param_lr_scale
            values.update(beta1=self.interval / step / k, beta2=step / self.interval / k,
                          start=-zero_point * self.interval / k, zero_point=zero_point)
        return values

    # --- integer grid ----------------------------------------------------------------------
    def integer_grid(self, weights):
        """``ThresholdGrid`` whose ``input_grid`` is the 8-bit grid of the pre-activation;
        ``out_scale = beta2 * 2/(2^b-1)``, ``out_zero_point`` 0 (``init="paper"``) or the
        integer set by ``init="data"``."""
        self._require_initialized(weights)
        scale, _, zero_point = self._input_grid_tensors(weights)
        codes = self._threshold_codes(weights, scale, zero_point).numpy().astype(np.int64)
        scale = float(scale.numpy())
        zero_point = int(zero_point.numpy())
        beta2 = self._parameters(weights)[3]
        out_scale = float((beta2 * self.interval).numpy())
        input_grid = UniformGrid(scale=scale, zero_point=zero_point, bits=INPUT_BITS,
                                 qmin=INPUT_QMIN, qmax=INPUT_QMAX)
        thresholds = (codes + 0.5 - zero_point) * scale  # half a step above code m_k
        out_zero_point = int(np.round(keras.backend.get_value(weights["zero_point"])))
        return ThresholdGrid(thresholds=thresholds, out_scale=out_scale, out_zero_point=out_zero_point,
                             bits=self.bits, input_grid=input_grid)

    def parameters(self, weights):
        """Effective values (NumPy) for reports: start, lengths, beta1, beta2, the thresholds
        ``T_k`` (in units of ``beta1 * x``), the 8-bit input scale and zero point."""
        start, lengths, beta1, beta2 = (p.numpy() for p in self._parameters(weights))
        scale, _, zero_point = self._input_grid_tensors(weights)
        lower_ends = start + np.cumsum(lengths) - lengths
        return {"start": float(start), "lengths": lengths, "beta1": float(beta1), "beta2": float(beta2),
                "output_zero_point": int(np.round(keras.backend.get_value(weights["zero_point"]))),
                "thresholds": lower_ends + lengths / 2.0, "input_scale": float(scale.numpy()),
                "input_zero_point": int(zero_point.numpy())}


@base.register("n2uq_weight")
class N2UQWeightQuantizer(base.TFQQuantizer):
    """N2UQ entropy-preserving weight quantizer (n2uq.txt sec. 3.2.3).

    Args:
      bits: 2..7 (the integer grid holds odd codes and needs ``bits + 1`` bits).
      per_axis: axes with their own ``S``: -1 (default) is the output channel of Conv2D (HWIO)
        and Dense (IO) kernels; DepthwiseConv2D kernels (H, W, C, M) need (2, 3); None for one
        ``S`` per tensor.

    Variable: ``<tensor>_scale`` = ``S`` of the latest training call (not trainable).
    """

    _init_only_when_training = False

    def __init__(self, bits=2, per_axis=-1):
        bits = base.check_bits(bits, high=MAX_WEIGHT_BITS)
        axes = base.normalize_axes(per_axis)
        super().__init__(bits=bits, per_axis=list(axes) if axes is not None else None)
        self.bits = bits
        self.per_axis = axes
        self.levels = 2 ** bits - 1  # odd-code bound (2^b - 1)

    def _build_variables(self, tensor_shape, name, layer):
        shape = tf.TensorShape(tensor_shape)
        if shape.rank is None:
            raise ValueError(f"{name}: N2UQ weights need a known kernel shape")
        self.per_axis = base.normalize_axes(self.per_axis, shape.rank)
        self._rank = shape.rank
        self._param_shape = base.param_shape(shape, self.per_axis)
        return {"scale": layer.add_weight(f"{name}_scale", shape=self._param_shape, trainable=False,
                                          initializer=keras.initializers.Constant(1.0))}

    def channel_scale(self, w):
        """``S = ((2^b - 1)/2^(b-1)) * mean|W|`` over every axis but ``per_axis``."""
        axes = None if self.per_axis is None else [a for a in range(self._rank) if a not in self.per_axis]
        gamma = (2 ** self.bits - 1) / 2 ** (self.bits - 1)
        return tf.maximum(gamma * tf.reduce_mean(tf.abs(w), axis=axes), 1e-8)

    def _broadcast(self, param):
        if self.per_axis is None:
            return param
        return tf.reshape(param, base.broadcast_shape(self._rank, self.per_axis, self._param_shape))

    def _forward(self, inputs, training, weights):
        w = tf.convert_to_tensor(inputs)
        if training is True:
            scale = tf.stop_gradient(self.channel_scale(w))
            with tf.control_dependencies([weights["scale"].assign(scale)]):
                scale = tf.identity(scale)
        else:
            scale = tf.convert_to_tensor(weights["scale"])
        return entropy_preserving_quantize(w, self._broadcast(scale), self.bits)

    def _initial_values(self, w, weights):
        return {"scale": self.channel_scale(tf.cast(w, tf.float32))}

    def integer_grid(self, weights):
        """``UniformGrid(S/(2^b-1), 0, bits=b+1, qmin=-(2^b-1), qmax=2^b-1)``: the odd codes."""
        self._require_initialized(weights, "weight quantizer")
        scale = np.asarray(keras.backend.get_value(weights["scale"]), np.float64) / self.levels
        return UniformGrid(scale=scale, zero_point=np.zeros(scale.shape, np.int64), bits=self.bits + 1,
                           qmin=-self.levels, qmax=self.levels, axis=self.per_axis)
