"""The integer-grid contract: what a quantizer computes at inference, in integers.

Export, verification, cost accounting and reports read only these descriptions; they never
ask which method produced a quantizer. Every grid maps an integer code ``c`` to a real value.

* ``UniformGrid``: ``real = (c - zero_point) * scale`` with ``c`` in ``[qmin, qmax]`` (``bits``
  wide), ``scale``/``zero_point`` per tensor (``axis is None``) or per channel along ``axis``.
* ``ThresholdGrid``: an activation whose output is uniform (``out_scale``, ``out_zero_point``)
  but whose input thresholds are not: code ``k`` for ``x`` above ``thresholds[k-1]``.
* ``CodebookGrid``: ``real = levels_int8[c] * scale`` for a learned table of levels.
* ``PiecewiseGrid``: centre and tail uniform grids split at a breakpoint (PWLQ).

All arrays are NumPy and the dataclasses are frozen: a grid is a snapshot, not a view of
training variables.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import numpy as np

Axis = Optional[Union[int, Tuple[int, ...]]]


def _frozen_array(value, dtype) -> np.ndarray:
    arr = np.array(value, dtype=dtype)
    arr.setflags(write=False)
    return arr


@dataclasses.dataclass(frozen=True)
class UniformGrid:
    """``real = (code - zero_point) * scale``, ``code`` in ``[qmin, qmax]``.

    ``axis``: ``None`` for per-tensor; otherwise the tensor axes that carry their own
    scale (``scale.shape`` equals the tensor's shape on those axes).
    """

    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    qmin: int
    qmax: int
    axis: Axis = None

    def __post_init__(self):
        object.__setattr__(self, "scale", _frozen_array(self.scale, np.float64))
        object.__setattr__(self, "zero_point", _frozen_array(self.zero_point, np.int64))
        if self.qmax - self.qmin + 1 > 2 ** self.bits:
            raise ValueError(
                f"UniformGrid: range [{self.qmin}, {self.qmax}] holds more than 2^{self.bits} codes")
        if np.any(self.scale <= 0):
            raise ValueError("UniformGrid: every scale must be > 0")

    @property
    def num_codes(self) -> int:
        return self.qmax - self.qmin + 1

    def to_int8_container(self):
        """(scale, zero_point) of an int8 tensor holding these codes: ``c8 = c - shift``.

        The codes ``[qmin, qmax]`` are shifted into ``[-128, 127]`` (for unsigned ranges
        ``shift = 128``; signed ranges are already inside int8), and the zero point follows.
        Returns ``(scale, int8_zero_point, code_min_int8, code_max_int8)``.
        """
        if self.bits > 8:
            raise ValueError(f"UniformGrid: {self.bits}-bit codes do not fit an int8 container")
        shift = 0 if self.qmin >= -128 and self.qmax <= 127 else self.qmin + 128
        zp8 = self.zero_point - shift
        return self.scale, zp8, self.qmin - shift, self.qmax - shift

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """Integer codes of ``x`` (NumPy reference, round half to even like ``tf.round``)."""
        s, z = self._broadcast(x)
        return np.clip(np.round(x / s) + z, self.qmin, self.qmax).astype(np.int64)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        s, z = self._broadcast(codes)
        return (codes - z) * s

    def _broadcast(self, x):
        if self.axis is None:
            return self.scale, self.zero_point
        axes = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
        axes = tuple(a % x.ndim for a in axes)
        shape = [x.shape[a] if a in axes else 1 for a in range(x.ndim)]
        return self.scale.reshape(shape), self.zero_point.reshape(shape)


def _code_table(input_grid, to_output_code):
    """int8 output code for each of the 256 int8 input codes of ``input_grid``."""
    if input_grid is None:
        raise ValueError("this grid has no input_grid: it describes weights, not an activation")
    codes = np.arange(-128, 128)
    real = input_grid.dequantize(codes - input_grid.to_int8_container()[1] + input_grid.zero_point)
    return to_output_code(real).astype(np.int64)


@dataclasses.dataclass(frozen=True)
class ThresholdGrid:
    """Non-uniform input thresholds, uniform outputs (N2UQ activations).

    Output code ``k`` (``0..2^bits-1``) is taken for inputs ``> thresholds[k-1]``; its
    real value is ``(k - out_zero_point) * out_scale``. ``input_grid`` is the 8-bit grid of the
    tensor the thresholds act on (the int8 pre-activation of the integer model); the training
    forward thresholds values already on that grid, so ``code_table`` is exact.
    """

    thresholds: np.ndarray
    out_scale: float
    out_zero_point: int
    bits: int
    input_grid: Optional[UniformGrid] = None

    def __post_init__(self):
        object.__setattr__(self, "thresholds", _frozen_array(self.thresholds, np.float64))
        if self.thresholds.shape != (2 ** self.bits - 1,):
            raise ValueError(
                f"ThresholdGrid: {self.bits} bits need {2 ** self.bits - 1} thresholds, "
                f"got shape {self.thresholds.shape}")
        if np.any(np.diff(self.thresholds) < 0):
            raise ValueError("ThresholdGrid: thresholds must be non-decreasing")
        if self.input_grid is not None and self.input_grid.axis is not None:
            raise ValueError("ThresholdGrid: input_grid must be per tensor")

    def quantize(self, x: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.thresholds, x, side="left").astype(np.int64)

    def dequantize(self, codes: np.ndarray) -> np.ndarray:
        return (codes - self.out_zero_point) * self.out_scale

    def code_table(self) -> np.ndarray:
        """Output code (``0..2^bits-1``) for each int8 input code ``-128..127``."""
        return _code_table(self.input_grid, self.quantize)


@dataclasses.dataclass(frozen=True)
class CodebookGrid:
    """Learned levels on an int8 grid (DDQ): ``real = (levels_int8[index] - zero_point) * scale``.

    ``levels_int8`` holds the ``2^bits`` effective levels (sorted int8 values; per channel along
    ``axis`` when 2-D, channels first); weights use ``zero_point == 0``. For an activation,
    ``input_grid`` is the 8-bit grid of the tensor it maps (as in ``ThresholdGrid``) and each
    input maps to its nearest level.
    """

    levels_int8: np.ndarray
    scale: np.ndarray
    bits: int
    axis: Axis = None
    zero_point: int = 0
    input_grid: Optional[UniformGrid] = None

    def __post_init__(self):
        object.__setattr__(self, "levels_int8", _frozen_array(self.levels_int8, np.int64))
        object.__setattr__(self, "scale", _frozen_array(self.scale, np.float64))
        if np.any(self.levels_int8 < -128) or np.any(self.levels_int8 > 127):
            raise ValueError("CodebookGrid: levels must be int8 values")
        if self.levels_int8.shape[-1] > 2 ** self.bits:
            raise ValueError(f"CodebookGrid: more than 2^{self.bits} levels")
        if self.input_grid is not None and (self.axis is not None or self.levels_int8.ndim != 1):
            raise ValueError("CodebookGrid: an activation codebook is per tensor")

    def nearest_level_code(self, x: np.ndarray) -> np.ndarray:
        """int8 code of the level nearest to each real ``x`` (per-tensor codebooks)."""
        real = (self.levels_int8 - self.zero_point) * float(self.scale)
        idx = np.argmin(np.abs(np.asarray(x)[..., None] - real), axis=-1)
        return self.levels_int8[idx]

    def code_table(self) -> np.ndarray:
        """Output int8 code for each int8 input code ``-128..127`` (activations)."""
        return _code_table(self.input_grid, self.nearest_level_code)


@dataclasses.dataclass(frozen=True)
class PiecewiseGrid:
    """Two-piece symmetric grid (PWLQ, pwlq.txt eq. 3), per channel along ``axis``.

    ``|w| <= breakpoint``: ``w = sign * c * centre_scale``; above: ``w = sign * (breakpoint +
    c * tail_scale)``; ``c`` in ``[0, 2^bits_per_piece - 1]``.
    """

    breakpoint: np.ndarray
    centre_scale: np.ndarray
    tail_scale: np.ndarray
    bits_per_piece: int
    axis: Axis = None

    def __post_init__(self):
        for name in ("breakpoint", "centre_scale", "tail_scale"):
            object.__setattr__(self, name, _frozen_array(getattr(self, name), np.float64))


Grid = Union[UniformGrid, ThresholdGrid, CodebookGrid, PiecewiseGrid]


class HasIntegerGrid:
    """Mixin for quantizers: ``integer_grid(weights)`` returns one of the grids above.

    ``weights`` is the dict of the quantizer's variables that ``build`` returned. Raises
    ``UncalibratedError`` if the quantizer has not yet seen data.
    """

    def integer_grid(self, weights) -> Grid:  # pragma: no cover - interface
        raise NotImplementedError


class UncalibratedError(RuntimeError):
    """A quantizer was asked for its grid before it saw any data."""
