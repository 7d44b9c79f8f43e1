"""Fixed weight quantizers of post-training PWLQ (pwlq.txt; SPEC.md "PWLQ").

``tfq.ptq.pwlq`` chooses every parameter with the NumPy core (``tfq.ptq.pwlq_core``) and assigns
them; these quantizers only apply them, so their variables are non-trainable and they never
initialise themselves from data.

* ``PWLQWeightQuantizer``: eq. 3 with ``b`` bits per piece (``L = 2^b - 1``), per channel (or per
  group, when ``per_axis`` also names the input-channel axis)::

      |w| <= p:  w_q = sign(w) * c * s_c,         c = clip(round(|w| / s_c), 0, L)
      |w| >  p:  w_q = sign(w) * (p + c * s_t),   c = clip(round((|w| - p) / s_t), 0, L)

  Integer grid: ``PiecewiseGrid(breakpoint=p, centre_scale=s_c, tail_scale=s_t)``.
* ``FixedUniformWeightQuantizer``: symmetric uniform (eq. 1, ``z = 0``) with codes in
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]``, for the method="uniform" baseline and for first/last layers.
  Integer grid: ``UniformGrid``.

Both optionally add a per-output-channel ``shift`` (``bias_correction="exact"``: the mean part
of the bias correction, which no single grid holds because ``sum_i (w_i + d) x_i`` needs the sum
of the inputs, the paper's eq. 13 accumulator ``<X_q, I>``). Their grid is then
``ShiftedGrid(grid, shift, axis)``, a type export must handle explicitly (proposed for
``tfq.quantizers.grid``), so no exporter ignores the shift by accident.

Gradients are straight-through (identity to the kernel): it is post-training quantization, but a
user may still fine-tune the returned model. Forward is exactly representable by the grid: it is
the grid's value of the codes the forward picks.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Union

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq.ptq import pwlq_core
from tfq.quantizers import base
from tfq.quantizers.grid import Axis, PiecewiseGrid, UniformGrid

base.register_variable_roles("breakpoint", "centre_scale", "tail_scale", "shift")

BITS_MEANS = pwlq_core.BITS_MEANS


# --- forward -------------------------------------------------------------------------------

def piecewise_fake_quant(w, breakpoint, centre_scale, tail_scale, bits_per_piece):
    """Eq. 3 forward on ``w`` with parameters that broadcast against it; identity gradient to
    ``w`` (STE), none to the parameters."""
    levels = float(2 ** bits_per_piece - 1)

    @tf.custom_gradient
    def _pwq(w, p, s_c, s_t):
        magnitude = tf.abs(w)
        centre = magnitude <= p
        c_centre = tf.clip_by_value(tf.round(magnitude / s_c), 0.0, levels)
        c_tail = tf.clip_by_value(tf.round((magnitude - p) / s_t), 0.0, levels)
        value = tf.where(centre, c_centre * s_c, p + c_tail * s_t)
        out = tf.where(w < 0, -value, value)

        def grad(dy):
            return dy, tf.zeros_like(p), tf.zeros_like(s_c), tf.zeros_like(s_t)

        return out, grad

    return _pwq(w, breakpoint, centre_scale, tail_scale)


def uniform_fake_quant(w, scale, bits):
    """Symmetric narrow-range uniform forward ``clip(round(w/s), -q, q) * s`` with
    ``q = 2^(bits-1) - 1``; identity gradient to ``w`` (STE), none to ``scale``."""
    qmax = float(2 ** (bits - 1) - 1)

    @tf.custom_gradient
    def _uq(w, s):
        out = tf.clip_by_value(tf.round(w / s), -qmax, qmax) * s

        def grad(dy):
            return dy, tf.zeros_like(s)

        return out, grad

    return _uq(w, scale)


# --- grids ---------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ShiftedGrid:
    """``real = grid value + shift``, ``shift`` per output channel along ``axis`` (PWLQ's exact
    bias correction). Export needs the sum of the inputs over each receptive field for it."""

    grid: Union[PiecewiseGrid, UniformGrid]
    shift: np.ndarray
    axis: Axis = None

    def __post_init__(self):
        arr = np.array(self.shift, dtype=np.float64)
        arr.setflags(write=False)
        object.__setattr__(self, "shift", arr)


def broadcast_parameter(value, axis, ndim):
    """A grid parameter given along ``axis`` (int, tuple or None) reshaped to broadcast against a
    tensor of rank ``ndim``."""
    if axis is None:
        return np.asarray(value)
    axes = (axis,) if isinstance(axis, (int, np.integer)) else tuple(axis)
    axes = tuple(a % ndim for a in axes)
    value = np.asarray(value)
    shape = [1] * ndim
    for a, n in zip(sorted(axes), value.shape):
        shape[a] = n
    return value.reshape(shape)


def piecewise_codes(grid: PiecewiseGrid, w):
    """``(sign, codes, tail)`` of eq. 3 for the real kernel ``w`` on ``grid`` (NumPy, float64,
    round half to even): ``sign`` int8 +-1, ``codes`` int64 in ``[0, 2^b - 1]``, ``tail`` bool."""
    w = np.asarray(w, np.float64)
    p, s_c, s_t = (broadcast_parameter(v, grid.axis, w.ndim)
                   for v in (grid.breakpoint, grid.centre_scale, grid.tail_scale))
    levels = 2 ** grid.bits_per_piece - 1
    magnitude = np.abs(w)
    tail = magnitude > p
    codes = np.where(tail, np.round((magnitude - p) / s_t), np.round(magnitude / s_c))
    codes = np.clip(codes, 0, levels).astype(np.int64)
    sign = np.where(w < 0, -1, 1).astype(np.int8)
    return sign, codes, tail


def piecewise_values(grid: PiecewiseGrid, sign, codes, tail):
    """Real values of ``(sign, codes, tail)`` on ``grid`` (float64)."""
    codes = np.asarray(codes)
    p, s_c, s_t = (broadcast_parameter(v, grid.axis, codes.ndim)
                   for v in (grid.breakpoint, grid.centre_scale, grid.tail_scale))
    return np.asarray(sign) * np.where(tail, p + codes * s_t, codes * s_c)


def integer_tail_ratio(grid: PiecewiseGrid, rtol=1e-5) -> Optional[np.ndarray]:
    """``k = tail_scale / centre_scale`` per entry when every ratio is a whole number >= 1 and
    ``breakpoint = (2^b - 1) * centre_scale`` (within ``rtol``): then every weight is an integer
    multiple ``n`` of ``centre_scale`` with ``|n| <= (2^b - 1)(k + 1)``, and one int8 convolution
    holds the layer when that is <= 127. ``None`` otherwise."""
    ratio = np.asarray(grid.tail_scale) / np.asarray(grid.centre_scale)
    k = np.round(ratio)
    levels = 2 ** grid.bits_per_piece - 1
    if (np.any(k < 1) or not np.allclose(ratio, k, rtol=rtol, atol=0)
            or not np.allclose(grid.breakpoint, levels * np.asarray(grid.centre_scale), rtol=rtol, atol=0)):
        return None
    return k.astype(np.int64)


# --- quantizers ----------------------------------------------------------------------------

class _FixedWeightQuantizer(base.TFQQuantizer):
    """Per-axis parameters set once by ``assign``; optional per-output-channel ``shift``."""

    data_dependent_init = False
    _parameter_roles = ()

    def __init__(self, per_axis=None, shift_axis=None, **config):
        axes = base.normalize_axes(per_axis)
        shift_axes = base.normalize_axes(shift_axis)
        if shift_axes is not None and axes is None:
            raise ValueError("shift_axis needs per_axis (a per-channel shift of a per-tensor grid is "
                             "not supported)")
        super().__init__(per_axis=list(axes) if axes is not None else None,
                         shift_axis=list(shift_axes) if shift_axes is not None else None, **config)
        self.per_axis = axes
        self.shift_axis = shift_axes

    def _build_variables(self, tensor_shape, name, layer):
        shape = tf.TensorShape(tensor_shape)
        if shape.rank is None:
            raise ValueError(f"{name}: {type(self).__name__} needs a known kernel shape")
        self._rank = shape.rank
        self.per_axis = base.normalize_axes(self.per_axis, shape.rank)
        self._param_shape = base.param_shape(shape, self.per_axis)
        weights = {role: layer.add_weight(f"{name}_{role}", shape=self._param_shape, trainable=False,
                                          initializer=keras.initializers.Constant(1.0))
                   for role in self._parameter_roles}
        if self.shift_axis is not None:
            self.shift_axis = base.normalize_axes(self.shift_axis, shape.rank)
            self._shift_shape = base.param_shape(shape, self.shift_axis)
            weights["shift"] = layer.add_weight(f"{name}_shift", shape=self._shift_shape, trainable=False,
                                                initializer=keras.initializers.Constant(0.0))
        return weights

    def _param(self, weights, role, x, axes=None, shape=None):
        value = tf.convert_to_tensor(weights[role])
        axes = self.per_axis if axes is None else axes
        shape = self._param_shape if shape is None else shape
        if axes is None:
            return value
        return tf.reshape(value, base.broadcast_shape(x.shape.rank, axes, shape))

    def _forward(self, inputs, training, weights):
        x = tf.convert_to_tensor(inputs)
        out = self._quantize(x, weights)
        if self.shift_axis is not None:
            out = out + self._param(weights, "shift", x, self.shift_axis, self._shift_shape)
        return out

    def assign(self, weights, **values):
        """Set the parameters (NumPy arrays of the per-axis shape) and mark the quantizer ready."""
        expected = set(self._parameter_roles) | ({"shift"} if self.shift_axis is not None else set())
        if set(values) != expected:
            raise ValueError(f"{type(self).__name__}.assign needs exactly {sorted(expected)}, "
                             f"got {sorted(values)}")
        for role, value in values.items():
            arr = np.asarray(value, np.float64)
            var = weights[role]
            if arr.shape != tuple(var.shape):
                raise ValueError(f"{role} has shape {arr.shape}, the quantizer expects {tuple(var.shape)}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{role} contains NaN or Inf")
            if role == "breakpoint" and np.any(arr < 0):
                raise ValueError("breakpoint must be >= 0 everywhere (0 only for all-zero channels)")
            if role not in ("shift", "breakpoint") and np.any(arr <= 0):
                raise ValueError(f"{role} must be > 0 everywhere")
            var.assign(arr.astype(var.dtype.as_numpy_dtype))
        weights["initialized"].assign(True)

    def _value(self, weights, role):
        return np.asarray(keras.backend.get_value(weights[role]), np.float64)

    def _axis_attr(self):
        return tuple(self.per_axis) if self.per_axis is not None else None

    def integer_grid(self, weights):
        self._require_initialized(weights, "weight quantizer")
        grid = self._grid(weights)
        if self.shift_axis is None:
            return grid
        return ShiftedGrid(grid, self._value(weights, "shift"), tuple(self.shift_axis))


@base.register("pwlq")
class PWLQWeightQuantizer(_FixedWeightQuantizer):
    """Piecewise linear weight quantizer (pwlq.txt eq. 3) with fixed per-channel parameters.

    Args:
      bits: the weight bit budget (2..8).
      bits_mean: how ``bits`` maps to bits per piece: "piece" (b), "comp" (b-1), "stor" (b-2).
      per_axis: kernel axes with their own breakpoint and scales (output channels; plus the
        input-channel axis for per-group quantization, values repeated over each group).
      shift_axis: output-channel axes of an additive per-channel shift (exact bias correction).

    ``effective_bits`` is what a weight stores: bits per piece + a sign bit + a region bit.
    """

    _parameter_roles = ("breakpoint", "centre_scale", "tail_scale")

    def __init__(self, bits=4, bits_mean="piece", per_axis=None, shift_axis=None):
        self.bits_per_piece = pwlq_core.bits_per_piece(bits, bits_mean)  # validates both
        super().__init__(per_axis=per_axis, shift_axis=shift_axis, bits=int(bits), bits_mean=bits_mean)
        self.bits = int(bits)
        self.bits_mean = bits_mean

    def _quantize(self, x, weights):
        p, s_c, s_t = (self._param(weights, role, x) for role in self._parameter_roles)
        return piecewise_fake_quant(x, p, s_c, s_t, self.bits_per_piece)

    def _grid(self, weights):
        p, s_c, s_t = (self._value(weights, role) for role in self._parameter_roles)
        return PiecewiseGrid(breakpoint=p, centre_scale=s_c, tail_scale=s_t,
                             bits_per_piece=self.bits_per_piece, axis=self._axis_attr())

    def effective_bits(self, weights):
        return tf.constant(float(self.bits_per_piece + 2), tf.float32)


@base.register("pwlq_uniform")
class FixedUniformWeightQuantizer(_FixedWeightQuantizer):
    """Symmetric uniform weight quantizer with fixed per-channel scales: codes in
    ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (the PWLQ paper's "Uni" baseline, and first/last layers).

    Args: ``bits`` (2..8), ``per_axis``, ``shift_axis`` as for ``PWLQWeightQuantizer``.
    """

    _parameter_roles = ("scale",)

    def __init__(self, bits=8, per_axis=None, shift_axis=None):
        bits = base.check_bits(bits)
        super().__init__(per_axis=per_axis, shift_axis=shift_axis, bits=bits)
        self.bits = bits
        self.qmax = 2 ** (bits - 1) - 1

    def _quantize(self, x, weights):
        return uniform_fake_quant(x, self._param(weights, "scale", x), self.bits)

    def _grid(self, weights):
        scale = self._value(weights, "scale")
        return UniformGrid(scale=scale, zero_point=np.zeros(scale.shape, np.int64), bits=self.bits,
                           qmin=-self.qmax, qmax=self.qmax, axis=self._axis_attr())
