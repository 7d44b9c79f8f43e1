"""IntegerGraph: a pure NumPy int8/int32 inference engine with TFLite reference-kernel arithmetic.

The engine reproduces, bit for bit, what the LiteRT interpreter computes when it is built with
``experimental_op_resolver_type=OpResolverType.BUILTIN_REF`` (the portable reference kernels in
``tflite/kernels/internal/reference/``).  Every kernel below names the reference function it mirrors.
The arithmetic is done on NumPy ``int64`` arrays holding int32 values; where the C++ code works in
32 (or 16) bits and can wrap or saturate, the wrap/saturation is emulated explicitly.  Convolutions
accumulate in ``float64`` BLAS matrix products, which is exact for int8 x int8 sums shorter than 2**37
terms, and are then handled as int32 like the reference accumulator.

Building a graph
----------------
``IntegerGraph.from_tflite(bytes_or_path)`` reads a fully-int8 TFLite model.  Tensor shapes, types,
quantization parameters, constant data and the execution order of the operators come from the
interpreter (``get_tensor_details``, ``get_tensor``, ``_get_ops_details``).  Operator options (strides,
padding, fused activation, depth multiplier, axis, ...) are not exposed by the interpreter, so they are
read from the flatbuffer with the generated TFLite schema module.  Two copies of that module are
installed with the project's dependencies: ``tensorflow.lite.python.schema_py_generated`` and
``ai_edge_litert.schema_py_generated`` (same generated file, same object API).  We use TensorFlow's when
TensorFlow is already imported and LiteRT's otherwise: importing the TensorFlow one imports all of
TensorFlow (seconds), whereas LiteRT is needed anyway for the interpreter.  No hand-written flatbuffer
parsing is needed.  The graph can also be built directly (``IntegerGraph(ops, tensors, ...)``) by an
exporter that knows the integer grids.

Graph structure
---------------
* ``tensors``: ``{id: TensorSpec(name, shape, dtype, scale, zero_point, quantized_dimension)}`` --
  ``scale`` is a float32 array (one entry per tensor, or per channel along ``quantized_dimension``),
  ``zero_point`` an int64 array; both are empty for unquantized tensors (int32 shape tensors, float
  model inputs/outputs).
* ``constants``: ``{id: ndarray}`` -- int8 weights, int32 biases, int32 shape/axis/padding operands.
* ``ops``: list in execution order of ``{"op": "CONV_2D", "inputs": [ids], "outputs": [ids],
  "params": {...}}``; ``-1`` marks an omitted optional input (e.g. a convolution without bias).
  ``params`` holds the TFLite options with snake_case names (``stride_h``, ``padding`` = "SAME"/"VALID",
  ``activation`` = "NONE"/"RELU"/"RELU6"/"RELU_N1_TO_1", ``depth_multiplier``, ``axis``, ``keep_dims``,
  ``keep_num_dims``, ``beta``, ``alpha``, ...).  LOGISTIC/TANH also carry ``"table"``, the 256-entry
  int8 lookup table the reference kernel builds in Prepare (stored so that a saved graph does not depend
  on the platform's ``expf``/``tanhf``).
* ``inputs`` / ``outputs``: tensor ids.

File format (``save(path)`` / ``IntegerGraph.load(path)``)
--------------------------------------------------------
``path`` without extension (a trailing ``.json``/``.npz`` is stripped) gives two files:

* ``path.json``: ``{"format": "tfq.IntegerGraph", "version": 1, "inputs": [...], "outputs": [...],
  "tensors": {"<id>": {"name", "shape", "dtype", "scale": [float], "zero_point": [int],
  "quantized_dimension"}}, "ops": [{"op", "inputs", "outputs", "params"}]}``.  Scales are float32 values
  written as JSON doubles, which round-trips exactly.
* ``path.npz``: one array per constant tensor, named ``t<id>`` (dtype preserved).

Kernel parts (an IntegerGraph extension, not a TFLite op)
--------------------------------------------------------
A CONV_2D, DEPTHWISE_CONV_2D or FULLY_CONNECTED op may carry ``params["parts"]``: a list of tensor
ids of extra int8 weight constants shaped like its weight input, each with its own scale per output
channel (zero point 0).  The real kernel is ``sum_j s_j[c] * Q_j`` (``Q_0`` = the weight input).
PWLQ layers whose pieces are not one int8 grid export this way (``tfq.export.to_integer_graph``):
TFLite cannot, because each of its convolutions requantizes to int8, so summing the parts' outputs
would round twice.  Each part's accumulator ``acc_j = sum Q_j (x - z_in)`` is computed exactly as the
plain kernels do; then, per output channel ``c``, in int64::

    total = sum_j acc_j * m_j + bias * m_b,    m_j = round(s_in s_j / s_out * 2^e),  m_b = round(s_b / s_out * 2^e)
    out   = clamp(round_half_away(total / 2^e) + z_out, fused activation range)

one rounding in all, ``e <= 62`` the largest exponent for which ``total`` provably fits int64 (bounds
from the constant codes, ``_parts_multipliers``).  The bias is an int32 constant with its *own*
scale ``s_b`` (its TensorSpec; ``set_kernel_parts`` uses ``s_out * 2**-16``, so it holds the float
bias to 2**-17 output steps), not TFLite's ``s_in * s_w``.  ``save``/``load`` keep the parts (ids in
the JSON params, data in the NPZ); ops without ``parts`` are unchanged.  ``set_kernel_parts`` builds
such an op; ``parts_ops`` lists them.  Such a graph no longer equals the TFLite file it came from.

Running
-------
``graph.run(x)`` takes the model input exactly as the TFLite input tensor (an ``np.int8`` array, or
float32 if the model starts with a QUANTIZE op) and returns the output array (a list if the model has
several outputs).  The batch dimension may be larger than the one in the TFLite model.
``graph.run_op(index, tensors)`` runs one op on given input arrays (teacher forcing,
``tfq.export.verify.locate_divergence``).

XNNPACK arithmetic
------------------
``run(x, arithmetic="xnnpack")`` computes what LiteRT 2.3 computes with its default XNNPACK
delegate: XNNPACK's arithmetic for the int8 ops the delegate takes (``xnnpack_arithmetic_ops()``),
the reference kernels for the others (the builtin kernels that run them give the same results, except
ADD/MUL at scale ratios >= 256, which saturate where the reference kernels wrap).  Measured with
one-op models on every input code or on accumulators chosen where candidate formulas round apart
(tests/test_xnnpack_arithmetic.py); every product and quotient below is float32, ``round`` is half to
even, results are clamped to int8 and the fused activation range:

* CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED (int8 weights, zero point 0):
  ``round(float32(acc) * M_c) + z_out`` with ``M_c = float32(s_in * s_w[c]) / s_out`` -- not the
  float32 value of TFLite's fixed-point multiplier, which rounds a few near-tie accumulators apart.
* MUL: ``round(float32((a - z_a)(b - z_b)) * (float32(s_a * s_b) / s_out)) + z_out``; taken when that
  scale is in [2^-16, 2^8).
* ADD/SUB, in int32: ``((bias + a m_a + b m_b) >> k) + z_out`` with ``r_i = s_i / s_out``,
  ``k = 20 - floor(log2 max |r_i|)``, ``m_i = round(r_i 2^k)`` (``m_b`` negated for SUB),
  ``bias = 2^(k-1) - m_a z_a - m_b z_b``: halves round up.  Taken when both ratios are in [2^-10, 2^8).
* MEAN over n values: ``round(float32(sum x) * M + (z_out - float32(n z_in) * M))`` with
  ``M = (s_in / s_out) * (1 / n)``: both zero points enter before the rounding.
* QUANTIZE float -> int8: ``round(x * (1 / s)) + z``.  int8 -> int8 and LEAKY_RELU: 8-bit fixed
  point ``(256 z_out + 128 + d m) >> 8`` on ``d = x - z_in`` with ``m = round(256 s_in / s_out)``
  (LEAKY_RELU: on ``d = z_in - x`` with ``-round(256 r)`` / ``-round(256 alpha r)``); taken when the
  ratios are in [2^-8, 2^7].
* Run by XNNPACK with the reference results (``XNNPACK_REFERENCE_EQUAL_OPS``): LOGISTIC, TANH,
  MAX_POOL_2D, PAD, CONCATENATION, RESHAPE, DEQUANTIZE.  Left to the builtin kernels
  (``XNNPACK_UNDELEGATED_OPS``): HARD_SWISH, MINIMUM, MAXIMUM, RELU, RELU6, SOFTMAX,
  AVERAGE_POOL_2D, and convolutions with INT4 weights.
* Kernel-parts ops keep their own exact arithmetic in both modes.

Deliberate choices
------------------
* Requantization everywhere uses double rounding (``SaturatingRoundingDoublingHighMul`` then
  ``RoundingDivideByPOT``) as in ``common.cc`` built without ``TFLITE_SINGLE_ROUNDING``.
* FULLY_CONNECTED (per-tensor and per-channel weights) follows the reference kernel of the installed
  LiteRT (``reference_integer_ops::FullyConnected[PerChannel]`` overloads taking float scales): the
  int32 accumulator is scaled in double precision and rounded half away from zero
  (``round(acc * s_in * s_w / s_out)``), not with the fixed-point multiplier.  Measured on LiteRT 2.3:
  the older per-tensor path (fixed-point multiplier of the float32 product ``s_in * s_w``) differs by
  one step on ~10% of the outputs of a small Dense layer, and fixed-point per-channel multipliers
  differ on 0.1-6% of the outputs depending on the shift (tests ``dense_narrow_*``).
* LOGISTIC/TANH on int8 use the 256-entry table that ``LUTPopulate<int8_t>`` builds with float32
  arithmetic and the C library's ``expf``/``tanhf`` (called through ctypes when available, so the
  table equals the interpreter's; NumPy float32 is the fallback).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import math
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "IntegerGraph",
    "TensorSpec",
    "IntegerGraphError",
    "UnsupportedOpError",
    "quantize_multiplier",
    "multiply_by_quantized_multiplier",
    "saturating_rounding_doubling_high_mul",
    "rounding_divide_by_pot",
    "SUPPORTED_OPS",
    "ARITHMETICS",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
_FORMAT = "tfq.IntegerGraph"
_VERSION = 1


class IntegerGraphError(ValueError):
    """A model or an input the integer engine cannot handle (float tensors, bad shapes, ...)."""


class UnsupportedOpError(IntegerGraphError, NotImplementedError):
    """A TFLite operator the integer engine does not implement."""


# ----------------------------------------------------------------------------------------------
# Fixed-point primitives (tflite/kernels/internal/common.h, common.cc, quantization_util.cc,
# gemmlowp fixedpoint.h).  All operate on int64 NumPy arrays holding int32 values.
# ----------------------------------------------------------------------------------------------

def _round_half_away(x):
    """TfLiteRound / std::round: nearest integer, halves away from zero (x as float64)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def _wrap32(x):
    """Two's-complement wrap of int64 values to int32 (what int32 overflow does in practice)."""
    x = np.asarray(x, dtype=np.int64)
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _trunc_div_pow2(x, bits):
    """C integer division by 2**bits (rounds toward zero) for int64 arrays."""
    x = np.asarray(x, dtype=np.int64)
    return np.where(x >= 0, x >> bits, -((-x) >> bits))


def quantize_multiplier(real_multiplier: float) -> Tuple[int, int]:
    """Mirror of ``QuantizeMultiplier`` (quantization_util.cc).

    Returns ``(quantized_multiplier, shift)`` with ``real ~= quantized_multiplier * 2**(shift - 31)``;
    the multiplier is a Q0.31 value in ``[2**30, 2**31)`` (or 0), ``shift`` > 0 means a left shift.
    Uses frexp and rounds ``q * 2**31`` half away from zero; a result of exactly ``2**31`` is halved
    (and the shift incremented); multipliers below ``2**-31`` flush to ``(0, 0)``.
    """
    d = float(real_multiplier)
    if d == 0.0:
        return 0, 0
    if not math.isfinite(d):
        raise IntegerGraphError(f"cannot quantize the non-finite multiplier {real_multiplier!r}")
    q, shift = math.frexp(d)
    q_fixed = int(_round_half_away(q * float(1 << 31)))
    if q_fixed == (1 << 31):
        q_fixed //= 2
        shift += 1
    if shift < -31:
        shift, q_fixed = 0, 0
    return int(q_fixed), int(shift)


def _quantize_multiplier_array(reals) -> Tuple[np.ndarray, np.ndarray]:
    """``quantize_multiplier`` applied to each element (per-channel multipliers)."""
    pairs = [quantize_multiplier(float(r)) for r in np.ravel(reals)]
    mult = np.array([p[0] for p in pairs], dtype=np.int64)
    shift = np.array([p[1] for p in pairs], dtype=np.int64)
    return mult, shift


def saturating_rounding_doubling_high_mul(a, b):
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` for int32: round(a*b / 2**31), saturating."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    res = _trunc_div_pow2(ab + nudge, 31)
    overflow = (a == b) & (a == INT32_MIN)
    return np.where(overflow, INT32_MAX, res)


def rounding_divide_by_pot(x, exponent):
    """gemmlowp ``RoundingDivideByPOT``: arithmetic right shift rounding to nearest, ties away from 0."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(acc, multiplier, shift):
    """Mirror of ``MultiplyByQuantizedMultiplier(int32_t x, int32_t m, int shift)`` (common.cc).

    Double rounding: ``RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x << left, m), right)``
    with ``left = max(shift, 0)``, ``right = max(-shift, 0)``; the left shift wraps like int32.
    ``multiplier``/``shift`` may be scalars or arrays broadcasting against ``acc`` (per channel on the
    last axis).  Returns an int64 array of int32 values.
    """
    acc = np.asarray(acc, dtype=np.int64)
    multiplier = np.asarray(multiplier, dtype=np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    x = _wrap32(acc << left)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), right)


def _mbqm_smaller_than_one_exp(x, multiplier, left_shift):
    """``MultiplyByQuantizedMultiplierSmallerThanOneExp`` (common.h, double rounding)."""
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(x, multiplier), -np.asarray(left_shift))


# --- int16 variants used by the quantized HARD_SWISH reference kernel ---------------------------

def _wrap16(x):
    x = np.asarray(x, dtype=np.int64)
    return ((x + (1 << 15)) & 0xFFFF) - (1 << 15)


def _srdhm16(a, b):
    """gemmlowp ``SaturatingRoundingDoublingHighMul`` for int16."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    res = _wrap16(_trunc_div_pow2(ab + nudge, 15))
    return np.where((a == b) & (a == -32768), 32767, res)


def _sdhm16(a, b):
    """``SaturatingDoublingHighMul`` of reference/hard_swish.h (truncating, not rounding)."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    res = _wrap16(_trunc_div_pow2(a * b, 15))
    return np.where((a == b) & (a == -32768), 32767, res)


def _saturating_left_shift16(x, amount):
    """``SaturatingLeftShift`` of reference/hard_swish.h."""
    return np.clip(np.asarray(x, dtype=np.int64) * (1 << int(amount)), -32768, 32767)


def _downscale_multiplier_to_int16(m32: int) -> int:
    """``DownScaleInt32ToInt16Multiplier`` (activations.cc)."""
    if m32 >= INT32_MAX - (1 << 15):
        return 32767
    return (m32 + (1 << 15)) >> 16


# --- gemmlowp fixed-point helpers for the quantized SOFTMAX reference kernel ----------------------

def _sat_shl32(x, exponent: int):
    """gemmlowp ``SaturatingRoundingMultiplyByPOT<+exponent>`` on int32 (saturating left shift)."""
    x = np.asarray(x, dtype=np.int64)
    threshold = (1 << (31 - exponent)) - 1
    res = _wrap32(x << exponent)
    res = np.where(x > threshold, INT32_MAX, res)
    return np.where(x < -threshold, INT32_MIN, res)


def _exp_on_interval_neg_quarter_to_0(a):
    """gemmlowp ``exp_on_interval_between_negative_one_quarter_and_0_excl`` (Q0.31)."""
    constant_term = 1895147668
    constant_1_over_3 = 715827883
    x = _wrap32(a + (1 << 28))
    x2 = saturating_rounding_doubling_high_mul(x, x)
    x3 = saturating_rounding_doubling_high_mul(x2, x)
    x4 = saturating_rounding_doubling_high_mul(x2, x2)
    x4_over_4 = rounding_divide_by_pot(x4, 2)
    inner = _wrap32(saturating_rounding_doubling_high_mul(_wrap32(x4_over_4 + x3), constant_1_over_3) + x2)
    poly = rounding_divide_by_pot(inner, 1)
    return _wrap32(constant_term + saturating_rounding_doubling_high_mul(constant_term, _wrap32(x + poly)))


def _exp_on_negative_values_q5_26(a):
    """gemmlowp ``exp_on_negative_values`` for a Q5.26 input, Q0.31 result."""
    a = np.asarray(a, dtype=np.int64)
    frac_bits, int_bits = 26, 5
    one_quarter = 1 << (frac_bits - 2)
    mask = one_quarter - 1
    a_mod = _wrap32((a & mask) - one_quarter)
    result = _exp_on_interval_neg_quarter_to_0(_sat_shl32(a_mod, int_bits))
    remainder = _wrap32(a_mod - a)
    barrel = [(-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535),
              (3, 720401), (4, 242)]
    for exponent, multiplier in barrel:
        if int_bits > exponent:
            bit = 1 << (frac_bits + exponent)
            result = np.where((remainder & bit) != 0,
                              saturating_rounding_doubling_high_mul(result, multiplier), result)
    return np.where(a == 0, INT32_MAX, result)


def _one_over_one_plus_x_for_x_in_0_1(a):
    """gemmlowp ``one_over_one_plus_x_for_x_in_0_1`` (Q0.31 in and out, Newton-Raphson)."""
    a = np.asarray(a, dtype=np.int64)
    s = a + INT32_MAX  # RoundingHalfSum(a, One())
    half_denominator = _trunc_div_pow2(s + np.where(s >= 0, 1, -1), 1)
    c48_17 = 1515870810
    c_neg32_17 = -1010580540
    x = _wrap32(c48_17 + saturating_rounding_doubling_high_mul(half_denominator, c_neg32_17))
    one_f2 = 1 << 29
    for _ in range(3):
        hdx = saturating_rounding_doubling_high_mul(half_denominator, x)
        one_minus = _wrap32(one_f2 - hdx)
        x = _wrap32(x + _sat_shl32(saturating_rounding_doubling_high_mul(x, one_minus), 2))
    return _sat_shl32(x, 1)


def _count_leading_zeros32(x):
    """``CountLeadingZeros`` of the value as uint32 (32 for zero)."""
    x = (np.asarray(x, dtype=np.int64) & 0xFFFFFFFF).astype(np.float64)
    bit_length = np.frexp(x)[1].astype(np.int64)  # exact: integers below 2**53
    return np.where(x > 0, 32 - bit_length, 32)


# ----------------------------------------------------------------------------------------------
# Small helpers mirroring kernel_util.cc / padding.h
# ----------------------------------------------------------------------------------------------

_ACTIVATIONS = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}
_PADDINGS = {0: "SAME", 1: "VALID"}


def _quantize_scalar(f: float, scale: float, zero_point: int) -> int:
    """``Quantize`` in CalculateActivationRangeQuantizedImpl: zp + round(f / scale) in float32."""
    return int(zero_point) + int(_round_half_away(np.float32(f) / np.float32(scale)))


def _activation_range(activation: str, scale: float, zero_point: int, qmin=-128, qmax=127):
    """``CalculateActivationRangeQuantized`` (kernel_util.cc) for int8 outputs."""
    if activation == "NONE":
        return qmin, qmax
    if activation == "RELU":
        return max(qmin, _quantize_scalar(0.0, scale, zero_point)), qmax
    if activation == "RELU6":
        return (max(qmin, _quantize_scalar(0.0, scale, zero_point)),
                min(qmax, _quantize_scalar(6.0, scale, zero_point)))
    if activation == "RELU_N1_TO_1":
        return (max(qmin, _quantize_scalar(-1.0, scale, zero_point)),
                min(qmax, _quantize_scalar(1.0, scale, zero_point)))
    raise UnsupportedOpError(f"fused activation {activation} is not supported on int8 tensors")


def _out_size(padding: str, size: int, filt: int, stride: int, dilation: int = 1) -> int:
    """``ComputeOutSize`` (kernels/padding.h)."""
    eff = (filt - 1) * dilation + 1
    if padding == "SAME":
        return (size + stride - 1) // stride
    if padding == "VALID":
        return (size + stride - eff) // stride
    raise IntegerGraphError(f"unknown padding {padding!r}")


def _padding_amounts(padding, size, filt, stride, dilation=1):
    """(out, pad_before, pad_after): ``ComputePaddingWithOffset``; the reference kernels use only the
    leading padding and skip taps beyond the input, which equals zero-padding the trailing side."""
    out = _out_size(padding, size, filt, stride, dilation)
    eff = (filt - 1) * dilation + 1
    total = max(0, (out - 1) * stride + eff - size)
    before = total // 2
    after = max(0, (out - 1) * stride + eff - size - before)
    return out, before, after


def _libm():
    name = ctypes.util.find_library("m")
    try:
        lib = ctypes.CDLL(name or "libm.so.6")
        for fn in ("expf", "tanhf"):
            getattr(lib, fn).restype = ctypes.c_float
            getattr(lib, fn).argtypes = [ctypes.c_float]
        return lib
    except (OSError, AttributeError):  # pragma: no cover - platform without a C libm
        return None


_LIBM = _libm()


def _expf(v: np.ndarray) -> np.ndarray:
    if _LIBM is not None:
        return np.array([_LIBM.expf(float(t)) for t in v], dtype=np.float32)
    return np.exp(v.astype(np.float32))  # pragma: no cover


def _tanhf(v: np.ndarray) -> np.ndarray:
    if _LIBM is not None:
        return np.array([_LIBM.tanhf(float(t)) for t in v], dtype=np.float32)
    return np.tanh(v.astype(np.float32))  # pragma: no cover


def _sigmoid_f32(v: np.ndarray) -> np.ndarray:
    one = np.float32(1.0)
    return (one / (one + _expf(-v))).astype(np.float32)


def _lut_int8(transform, s_in, z_in, s_out, z_out) -> List[int]:
    """``LUTPopulateInt8`` (common.h): table indexed by the int8 input value + 128."""
    vals = np.arange(-128, 128, dtype=np.int64)
    dequantized = (np.float32(s_in) * (vals - int(z_in)).astype(np.float32)).astype(np.float32)
    transformed = transform(dequantized).astype(np.float32)
    inverse_scale = np.float32(1.0) / np.float32(s_out)
    rescaled = _round_half_away((transformed * inverse_scale).astype(np.float32))
    quantized = (rescaled + int(z_out)).astype(np.int64)
    return [int(v) for v in np.clip(quantized, -128, 127)]


# ----------------------------------------------------------------------------------------------
# Graph containers
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class TensorSpec:
    """Shape, dtype and (per-tensor or per-channel) affine quantization of one tensor."""

    name: str
    shape: List[int]
    dtype: str
    scale: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.float32))
    zero_point: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    quantized_dimension: int = 0

    def __post_init__(self):
        self.shape = [int(s) for s in self.shape]
        self.dtype = str(np.dtype(self.dtype))
        self.scale = np.asarray(self.scale, dtype=np.float32).reshape(-1)
        self.zero_point = np.asarray(self.zero_point, dtype=np.int64).reshape(-1)
        self.quantized_dimension = int(self.quantized_dimension)

    @property
    def quantized(self) -> bool:
        return self.scale.size > 0

    @property
    def s(self) -> float:
        """Per-tensor scale (float32 value as a Python float)."""
        return float(self.scale[0])

    @property
    def z(self) -> int:
        """Per-tensor zero point."""
        return int(self.zero_point[0]) if self.zero_point.size else 0

    def to_json(self) -> Dict[str, Any]:
        return {"name": self.name, "shape": self.shape, "dtype": self.dtype,
                "scale": [float(v) for v in self.scale],
                "zero_point": [int(v) for v in self.zero_point],
                "quantized_dimension": self.quantized_dimension}

    @classmethod
    def from_json(cls, d: Dict[str, Any]) -> "TensorSpec":
        return cls(d["name"], d["shape"], d["dtype"], np.array(d["scale"], np.float32),
                   np.array(d["zero_point"], np.int64), d.get("quantized_dimension", 0))


_KERNELS: Dict[str, Any] = {}


def _registrar(table):
    """A decorator factory registering a kernel function in ``table`` under one or more op names."""
    def registrar(*names):
        def register(fn):
            for n in names:
                table[n] = fn
            return fn
        return register
    return registrar


_kernel = _registrar(_KERNELS)


class IntegerGraph:
    """An int8 TFLite graph executed with NumPy, bit-exact with the TFLite reference kernels."""

    def __init__(self, ops: Sequence[Dict[str, Any]], tensors: Dict[int, TensorSpec],
                 inputs: Sequence[int], outputs: Sequence[int],
                 constants: Optional[Dict[int, np.ndarray]] = None):
        self.ops: List[Dict[str, Any]] = [
            {"op": str(o["op"]), "inputs": [int(i) for i in o["inputs"]],
             "outputs": [int(i) for i in o["outputs"]], "params": dict(o.get("params", {}))}
            for o in ops]
        self.tensors: Dict[int, TensorSpec] = {int(k): v for k, v in tensors.items()}
        self.inputs = [int(i) for i in inputs]
        self.outputs = [int(i) for i in outputs]
        self.constants: Dict[int, np.ndarray] = {int(k): np.asarray(v) for k, v in (constants or {}).items()}
        self._cache: Dict[int, Dict[str, Any]] = {}
        self.validate()

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_tflite(cls, model) -> "IntegerGraph":
        """Build the graph from TFLite flatbuffer bytes or a ``.tflite`` path (see module docstring)."""
        if isinstance(model, (str, os.PathLike)):
            with open(model, "rb") as f:
                buf = f.read()
        else:
            buf = bytes(model)
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        interp = Interpreter(model_content=buf,
                             experimental_op_resolver_type=OpResolverType.BUILTIN_REF)
        interp.allocate_tensors()
        details = {d["index"]: d for d in interp.get_tensor_details()}
        ops_details = interp._get_ops_details()

        schema = _schema_module()
        fb = schema.ModelT.InitFromPackedBuf(buf, 0)
        if len(fb.subgraphs) != 1:
            raise UnsupportedOpError(
                f"the model has {len(fb.subgraphs)} subgraphs; IntegerGraph runs single-subgraph "
                "models only (no control flow)")
        sg = fb.subgraphs[0]
        op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
        if len(ops_details) != len(sg.operators or []):
            raise IntegerGraphError("interpreter and flatbuffer disagree on the number of operators")

        ops = []
        used = set()
        for idx, (od, fop) in enumerate(zip(ops_details, sg.operators)):
            oc = fb.operatorCodes[fop.opcodeIndex]
            code = max(int(oc.builtinCode), int(oc.deprecatedBuiltinCode))
            name = op_names.get(code, f"BUILTIN_{code}")
            if name == "CUSTOM":
                name = f"CUSTOM:{oc.customCode.decode() if isinstance(oc.customCode, bytes) else oc.customCode}"
            if od["op_name"] != name:
                raise IntegerGraphError(
                    f"TFLite op #{idx}: interpreter reports {od['op_name']} but the flatbuffer says {name}")
            inputs = [int(i) for i in od["inputs"]]
            outputs = [int(i) for i in od["outputs"]]
            if name not in _KERNELS:
                raise UnsupportedOpError(
                    f"TFLite op #{idx} {name} (inputs {inputs}, outputs {outputs}) is not supported by "
                    f"IntegerGraph; supported ops: {', '.join(SUPPORTED_OPS)}")
            params = _options_to_params(name, fop.builtinOptions)
            ops.append({"op": name, "inputs": inputs, "outputs": outputs, "params": params})
            used.update(i for i in inputs + outputs if i >= 0)

        inputs = [int(i) for i in sg.inputs]
        outputs = [int(i) for i in sg.outputs]
        used.update(inputs + outputs)
        tensors: Dict[int, TensorSpec] = {}
        constants: Dict[int, np.ndarray] = {}
        for t in sorted(used):
            d = details[t]
            qp = d["quantization_parameters"]
            tensors[t] = TensorSpec(d["name"], list(d["shape"]), np.dtype(d["dtype"]).name,
                                    np.asarray(qp["scales"], np.float32),
                                    np.asarray(qp["zero_points"], np.int64),
                                    int(qp["quantized_dimension"]))
            fbt = sg.tensors[t]
            b = fb.buffers[fbt.buffer] if fbt.buffer < len(fb.buffers) else None
            has_data = b is not None and ((b.data is not None and len(b.data) > 0) or (b.offset or 0) > 1)
            if has_data:
                constants[t] = np.array(interp.get_tensor(t), copy=True)

        graph = cls(ops, tensors, inputs, outputs, constants)
        graph._bake_tables()
        return graph

    def _bake_tables(self):
        """Store the LOGISTIC/TANH lookup tables in the op params (see module docstring)."""
        for op in self.ops:
            if op["op"] in ("LOGISTIC", "TANH") and "table" not in op["params"]:
                tin, tout = self.tensors[op["inputs"][0]], self.tensors[op["outputs"][0]]
                if tin.dtype == "int8":
                    op["params"]["table"] = _make_table(op["op"], tin, tout)

    # ---- validation ---------------------------------------------------------------------------

    def validate(self):
        """Check that every op is supported and that the tensors it needs are integer."""
        for idx, op in enumerate(self.ops):
            name = op["op"]
            if name not in _KERNELS:
                raise UnsupportedOpError(
                    f"TFLite op #{idx} {name} is not supported by IntegerGraph; supported ops: "
                    f"{', '.join(SUPPORTED_OPS)}")
            for t in op["inputs"] + op["outputs"]:
                if t >= 0 and t not in self.tensors:
                    raise IntegerGraphError(f"op #{idx} {name} refers to unknown tensor {t}")
            if op["params"].get("parts"):
                self._validate_parts(idx, op)
            rule = _INT8_OPERANDS.get(name)
            if rule is None:
                continue
            in_pos, out_pos = rule
            checks = [("input", op["inputs"], p) for p in in_pos] + [("output", op["outputs"], p) for p in out_pos]
            for kind, ids, pos in checks:
                if pos == "*":
                    positions = range(len(ids))
                else:
                    positions = [pos] if pos < len(ids) else []
                for p in positions:
                    t = ids[p]
                    if t < 0:
                        continue
                    spec = self.tensors[t]
                    if spec.dtype != "int8":
                        raise IntegerGraphError(
                            f"op #{idx} {name}: {kind} {p} (tensor {t} '{spec.name}') is {spec.dtype}; the "
                            "integer engine needs int8 here. Convert the model with full-integer "
                            "quantization (TFLITE_BUILTINS_INT8, int8 input/output types).")
                    if not spec.quantized:
                        raise IntegerGraphError(
                            f"op #{idx} {name}: {kind} {p} (tensor {t} '{spec.name}') has no "
                            "quantization parameters")

    def _validate_parts(self, idx, op):
        """A kernel-parts op (module docstring): CONV_2D/DEPTHWISE_CONV_2D/FULLY_CONNECTED whose extra
        parts are int8 constants shaped like its weights, zero point 0, one scale or one per output
        channel; its bias (if any) an int32 constant with its own scale."""
        name = op["op"]
        where = f"op #{idx} {name}"
        if name not in PARTS_OPS:
            raise IntegerGraphError(f"{where}: params['parts'] is only defined for {', '.join(PARTS_OPS)}")
        ids = [op["inputs"][1]] + [int(t) for t in op["params"]["parts"]]
        shape = None
        for t in ids:
            if t not in self.constants or t not in self.tensors:
                raise IntegerGraphError(f"{where}: kernel part tensor {t} is not a constant of the graph")
            spec, value = self.tensors[t], self.constants[t]
            n_out = value.shape[_output_channel_axis(name)]
            shape = shape or value.shape
            if value.dtype != np.int8 or value.shape != shape:
                raise IntegerGraphError(f"{where}: kernel part tensor {t} must be int8 with the weights' shape "
                                        f"{list(shape)}, got {value.dtype} {list(value.shape)}")
            if spec.scale.size not in (1, n_out) or np.any(spec.zero_point != 0) or np.any(spec.scale <= 0):
                raise IntegerGraphError(f"{where}: kernel part tensor {t} needs one positive scale or one per "
                                        f"output channel ({n_out}) and zero point 0")
        b_id = op["inputs"][2] if len(op["inputs"]) > 2 else -1
        if b_id >= 0 and (b_id not in self.constants or not self.tensors[b_id].quantized
                          or self.constants[b_id].dtype != np.int32):
            raise IntegerGraphError(f"{where}: the bias of a kernel-parts op must be an int32 constant with "
                                    "its own scale")

    def set_kernel_parts(self, op_index: int, parts, bias, name: Optional[str] = None):
        """Make op ``op_index`` a kernel-parts op (module docstring, "Kernel parts").

        ``parts``: ``[(codes, scales)]``, ``codes`` integer arrays in the op's weight layout with
        ``|codes| <= 127``, ``scales`` the real step of each output channel; the real kernel is
        ``sum_j scales_j[c] * codes_j``. ``bias``: the real (float) bias per output channel, stored as
        int32 at ``s_out * 2**-PARTS_BIAS_FRACTION_BITS``. New tensors replace the op's weights and
        bias; tensors no other op uses are dropped. Returns the new tensor ids (parts, then bias).
        """
        op = self.ops[op_index]
        if op["op"] not in PARTS_OPS:
            raise IntegerGraphError(f"op #{op_index} {op['op']}: kernel parts need one of {', '.join(PARTS_OPS)}")
        old = [t for t in op["inputs"][1:3] if t >= 0]
        axis = _output_channel_axis(op["op"])
        tout = self.tensors[op["outputs"][0]]
        label = name or tout.name
        next_id = max(list(self.tensors) + list(self.constants) + [-1]) + 1
        ids = []
        for j, (codes, scales) in enumerate(parts):
            codes = np.asarray(codes)
            if np.any(np.abs(codes) > 127) or np.any(codes != np.round(codes)):
                raise IntegerGraphError(f"{label}: kernel part {j} holds codes outside the int8 range [-127, 127]")
            scales = np.asarray(scales, np.float64).reshape(-1)
            self.tensors[next_id] = TensorSpec(f"{label}/kernel_part{j}", list(codes.shape), "int8",
                                               scales.astype(np.float32), np.zeros(scales.size, np.int64), axis)
            self.constants[next_id] = codes.astype(np.int8)
            ids.append(next_id)
            next_id += 1
        bias = np.asarray(bias, np.float64).reshape(-1)
        s_out = float(np.float32(tout.s))
        bits = np.full(bias.shape, PARTS_BIAS_FRACTION_BITS, np.int64)
        magnitude = np.abs(bias) / s_out
        while np.any(magnitude * np.exp2(bits) >= 2.0 ** 30):
            bits = np.where(magnitude * np.exp2(bits) >= 2.0 ** 30, bits - 1, bits)
        bias_scale = (np.float32(s_out) * np.exp2(-bits)).astype(np.float32)
        self.tensors[next_id] = TensorSpec(f"{label}/bias_parts", [bias.size], "int32", bias_scale,
                                           np.zeros(bias.size, np.int64), 0)
        self.constants[next_id] = _round_half_away(bias / bias_scale.astype(np.float64)).astype(np.int32)
        op["inputs"] = [op["inputs"][0], ids[0], next_id] + op["inputs"][3:]
        op["params"]["parts"] = ids[1:]
        still_used = {t for o in self.ops for t in o["inputs"] + o["outputs"]} | set(self.inputs) | set(self.outputs)
        for t in old:
            if t not in still_used:
                self.tensors.pop(t, None)
                self.constants.pop(t, None)
        self._cache.pop(op_index, None)
        self.validate()
        return ids + [next_id]

    def parts_ops(self) -> List[int]:
        """Indices of the kernel-parts ops (they differ from TFLite's kernels by design)."""
        return [i for i, op in enumerate(self.ops) if op["params"].get("parts")]

    # ---- execution ----------------------------------------------------------------------------

    def run(self, x, return_tensors: bool = False, arithmetic: str = "reference"):
        """Run the graph.

        ``x``: one array (or a list, one per model input) laid out like the TFLite input tensor(s):
        ``np.int8`` for int8 inputs, float32 when the model starts with a float->int8 QUANTIZE.
        Returns the output array (a list if the model has several outputs); with
        ``return_tensors=True`` returns ``{tensor_id: array}`` for every tensor computed.
        ``arithmetic``: "reference" (the TFLite reference kernels, bit for bit) or "xnnpack" (what
        LiteRT 2.3 computes with its default XNNPACK delegate: XNNPACK's arithmetic for the ops it
        runs, the reference kernels for the others; module docstring "XNNPACK arithmetic").
        """
        _check_arithmetic(arithmetic)
        xs = list(x) if isinstance(x, (list, tuple)) else [x]
        if len(xs) != len(self.inputs):
            raise IntegerGraphError(f"the graph has {len(self.inputs)} inputs, got {len(xs)} arrays")
        env: Dict[int, np.ndarray] = dict(self.constants)
        for t, arr in zip(self.inputs, xs):
            spec = self.tensors[t]
            arr = np.asarray(arr)
            if spec.dtype == "int8":
                if arr.dtype != np.int8:
                    raise TypeError(
                        f"input tensor {t} '{spec.name}' is int8; pass an np.int8 array quantized with "
                        f"scale {spec.s:.6g} and zero point {spec.z} (got dtype {arr.dtype})")
            elif spec.dtype == "float32":
                arr = arr.astype(np.float32)
            else:
                arr = arr.astype(spec.dtype)
            if arr.ndim != len(spec.shape) or tuple(arr.shape[1:]) != tuple(spec.shape[1:]):
                raise IntegerGraphError(
                    f"input tensor {t} '{spec.name}' expects shape [N, {', '.join(map(str, spec.shape[1:]))}], "
                    f"got {list(arr.shape)}")
            env[t] = arr
        for idx, op in enumerate(self.ops):
            for t, r in zip(op["outputs"], self._invoke(idx, env, arithmetic)):
                env[t] = r
        if return_tensors:
            return env
        outs = [env[t] for t in self.outputs]
        return outs[0] if len(outs) == 1 else outs

    __call__ = run

    def run_op(self, index: int, tensors: Dict[int, np.ndarray], arithmetic: str = "reference") -> List[np.ndarray]:
        """Run op ``index`` alone: ``tensors`` maps tensor ids to arrays and must hold the op's
        non-constant inputs (constants come from the graph); returns one array per op output.
        ``arithmetic`` as in ``run``."""
        _check_arithmetic(arithmetic)
        if not isinstance(index, (int, np.integer)) or not 0 <= index < len(self.ops):
            raise IndexError(f"index must be an op index in [0, {len(self.ops)}), got {index!r}")
        missing = [t for t in self.ops[index]["inputs"] if t >= 0 and t not in tensors and t not in self.constants]
        if missing:
            raise IntegerGraphError(f"op #{index} {self.ops[index]['op']}: no array for input tensor(s) {missing}")
        return self._invoke(int(index), {**self.constants, **tensors}, arithmetic)

    def xnnpack_arithmetic_ops(self) -> List[int]:
        """Indices of the ops ``run(..., arithmetic="xnnpack")`` computes with XNNPACK's arithmetic
        (the others use the reference kernels)."""
        return [i for i, op in enumerate(self.ops) if self._kernel_for(op, "xnnpack") is not _KERNELS[op["op"]]]

    def _kernel_for(self, op, arithmetic):
        if arithmetic == "xnnpack" and op["op"] in _XNNPACK_KERNELS and _xnnpack_runs(self, op):
            return _XNNPACK_KERNELS[op["op"]]
        return _KERNELS[op["op"]]

    def _invoke(self, idx, env, arithmetic):
        op = self.ops[idx]
        args = [env[i] if i >= 0 else None for i in op["inputs"]]
        try:
            return self._kernel_for(op, arithmetic)(self, idx, op, args)
        except IntegerGraphError:
            raise
        except Exception as e:  # pragma: no cover - surfaces the failing op
            raise IntegerGraphError(f"op #{idx} {op['op']} failed: {e}") from e

    def _op_cache(self, idx: int) -> Dict[str, Any]:
        return self._cache.setdefault(idx, {})

    # ---- persistence --------------------------------------------------------------------------

    @staticmethod
    def _base(path) -> str:
        path = os.fspath(path)
        for ext in (".json", ".npz"):
            if path.endswith(ext):
                return path[: -len(ext)]
        return path

    def to_json(self) -> Dict[str, Any]:
        return {"format": _FORMAT, "version": _VERSION, "inputs": self.inputs, "outputs": self.outputs,
                "tensors": {str(k): v.to_json() for k, v in sorted(self.tensors.items())},
                "ops": [{"op": o["op"], "inputs": o["inputs"], "outputs": o["outputs"],
                         "params": _jsonable(o["params"])} for o in self.ops]}

    def save(self, path) -> Tuple[str, str]:
        """Write ``path.json`` (structure) and ``path.npz`` (constants); returns both file names."""
        base = self._base(path)
        d = os.path.dirname(base)
        if d:
            os.makedirs(d, exist_ok=True)
        with open(base + ".json", "w") as f:
            json.dump(self.to_json(), f, indent=1)
        np.savez(base + ".npz", **{f"t{k}": v for k, v in self.constants.items()})
        return base + ".json", base + ".npz"

    @classmethod
    def load(cls, path) -> "IntegerGraph":
        """Read a graph written by ``save``."""
        base = cls._base(path)
        with open(base + ".json") as f:
            meta = json.load(f)
        if meta.get("format") != _FORMAT:
            raise IntegerGraphError(f"{base}.json is not an IntegerGraph file")
        if int(meta.get("version", 0)) > _VERSION:
            raise IntegerGraphError(f"{base}.json has format version {meta['version']} > {_VERSION}")
        with np.load(base + ".npz") as z:
            constants = {int(k[1:]): z[k] for k in z.files}
        tensors = {int(k): TensorSpec.from_json(v) for k, v in meta["tensors"].items()}
        return cls(meta["ops"], tensors, meta["inputs"], meta["outputs"], constants)

    def summary(self) -> str:
        lines = []
        for i, op in enumerate(self.ops):
            outs = ", ".join(f"{t}{self.tensors[t].shape}" for t in op["outputs"])
            lines.append(f"#{i:3d} {op['op']:<20s} {op['inputs']} -> {outs}")
        return "\n".join(lines)

    def __repr__(self):
        return f"IntegerGraph({len(self.ops)} ops, inputs={self.inputs}, outputs={self.outputs})"


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, (bytes, bytearray)):
        return v.decode()
    return v


def _schema_module():
    """The generated TFLite flatbuffer schema (object API); see the module docstring."""
    candidates = ["tensorflow.lite.python.schema_py_generated", "ai_edge_litert.schema_py_generated"]
    if "tensorflow" not in sys.modules:
        candidates.reverse()
    import importlib
    errors = []
    for name in candidates:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError("no TFLite schema module found (" + "; ".join(errors) + ")")


def _options_to_params(name: str, opt) -> Dict[str, Any]:
    """Translate a flatbuffer ``*OptionsT`` object into the plain params dict of an op."""
    p: Dict[str, Any] = {}
    if opt is None:
        return p
    g = lambda attr, default=None: getattr(opt, attr, default)  # noqa: E731
    if g("fusedActivationFunction") is not None:
        p["activation"] = _ACTIVATIONS.get(int(g("fusedActivationFunction")), str(g("fusedActivationFunction")))
    if g("padding") is not None and name not in ("PAD", "PADV2"):
        p["padding"] = _PADDINGS[int(g("padding"))]
    for attr, key in (("strideH", "stride_h"), ("strideW", "stride_w"),
                      ("dilationHFactor", "dilation_h"), ("dilationWFactor", "dilation_w"),
                      ("filterHeight", "filter_h"), ("filterWidth", "filter_w"),
                      ("depthMultiplier", "depth_multiplier"), ("axis", "axis"),
                      ("valuesCount", "values_count"), ("batchDims", "batch_dims")):
        if g(attr) is not None:
            p[key] = int(g(attr))
    for attr, key in (("keepDims", "keep_dims"), ("keepNumDims", "keep_num_dims"),
                      ("potScaleInt16", "pot_scale_int16")):
        if g(attr) is not None:
            p[key] = bool(g(attr))
    for attr, key in (("beta", "beta"), ("alpha", "alpha")):
        if g(attr) is not None:
            p[key] = float(g(attr))
    if name == "FULLY_CONNECTED" and g("weightsFormat") not in (None, 0):
        raise UnsupportedOpError("FULLY_CONNECTED with shuffled weights is not supported")
    if g("newShape") is not None:
        p["new_shape"] = [int(v) for v in g("newShape")]
    if g("squeezeDims") is not None:
        p["squeeze_dims"] = [int(v) for v in g("squeezeDims")]
    for attr, key in (("beginMask", "begin_mask"), ("endMask", "end_mask"),
                      ("ellipsisMask", "ellipsis_mask"), ("newAxisMask", "new_axis_mask"),
                      ("shrinkAxisMask", "shrink_axis_mask")):
        if name == "STRIDED_SLICE" and g(attr) is not None:
            p[key] = int(g(attr))
    if name == "STRIDED_SLICE" and g("offset"):
        p["offset"] = bool(g("offset"))
    return p


def _make_table(name, tin: TensorSpec, tout: TensorSpec) -> List[int]:
    if name == "LOGISTIC":
        return _lut_int8(_sigmoid_f32, tin.s, tin.z, tout.s, tout.z)
    return _lut_int8(_tanhf, tin.s, tin.z, tout.s, tout.z)


# Operand positions that must be int8 (inputs, outputs); "*" = all of them.
_INT8_OPERANDS = {
    "CONV_2D": ([0, 1], [0]), "DEPTHWISE_CONV_2D": ([0, 1], [0]), "FULLY_CONNECTED": ([0, 1], [0]),
    "ADD": ([0, 1], [0]), "SUB": ([0, 1], [0]), "MUL": ([0, 1], [0]),
    "MAX_POOL_2D": ([0], [0]), "AVERAGE_POOL_2D": ([0], [0]), "MEAN": ([0], [0]),
    "LOGISTIC": ([0], [0]), "TANH": ([0], [0]), "HARD_SWISH": ([0], [0]), "RELU": ([0], [0]),
    "RELU6": ([0], [0]), "RELU_N1_TO_1": ([0], [0]), "RELU_0_TO_1": ([0], [0]), "LEAKY_RELU": ([0], [0]),
    "SOFTMAX": ([0], [0]), "DEQUANTIZE": ([0], []), "QUANTIZE": ([], [0]),
    "PAD": ([0], [0]), "PADV2": ([0], [0]), "MAXIMUM": ([0, 1], [0]), "MINIMUM": ([0, 1], [0]),
}


# ----------------------------------------------------------------------------------------------
# Kernels.  Signature: kernel(graph, op_index, op, input_arrays) -> list of output arrays.
# ----------------------------------------------------------------------------------------------

def _i64(a):
    return np.asarray(a).astype(np.int64)


def _to_int8(a):
    return np.asarray(a).astype(np.int8)


def _ts(graph: IntegerGraph, op, i, out=False) -> TensorSpec:
    return graph.tensors[(op["outputs"] if out else op["inputs"])[i]]


def _output_stage(acc, multiplier, shift, out_zp, act_min, act_max):
    """Requantize an int32 accumulator: clamp(MBQM(acc) + z_out, act_min, act_max) as int8."""
    out = multiply_by_quantized_multiplier(_wrap32(acc), multiplier, shift) + out_zp
    return _to_int8(np.clip(out, act_min, act_max))


def _conv_geometry(x_shape, kh, kw, p):
    sh, sw = p.get("stride_h", 1), p.get("stride_w", 1)
    dh, dw = p.get("dilation_h", 1), p.get("dilation_w", 1)
    oh, pt, pb = _padding_amounts(p.get("padding", "VALID"), x_shape[1], kh, sh, dh)
    ow, pl, pr = _padding_amounts(p.get("padding", "VALID"), x_shape[2], kw, sw, dw)
    return sh, sw, dh, dw, oh, ow, (pt, pb), (pl, pr)


def _taps(xp, kh, kw, sh, sw, dh, dw, oh, ow):
    """Yield (ky, kx, view [N, oh, ow, C]) for every filter tap of a zero-padded input."""
    for ky in range(kh):
        for kx in range(kw):
            y0, x0 = ky * dh, kx * dw
            yield ky, kx, xp[:, y0:y0 + (oh - 1) * sh + 1:sh, x0:x0 + (ow - 1) * sw + 1:sw, :]


def _conv_multipliers(graph, idx, op, n_out):
    """Per-channel multipliers of ``PopulateConvolutionQuantizationParams`` (kernel_util.cc):
    ``double(s_in) * double(s_w[c]) / double(s_out)``."""
    cache = graph._op_cache(idx)
    if "mult" not in cache:
        tin, tw, tout = _ts(graph, op, 0), _ts(graph, op, 1), _ts(graph, op, 0, out=True)
        sw = tw.scale if tw.scale.size > 1 else np.repeat(tw.scale, n_out)
        reals = [float(np.float32(tin.s)) * float(s) / float(np.float32(tout.s)) for s in sw]
        cache["mult"], cache["shift"] = _quantize_multiplier_array(reals)
        cache["act"] = _activation_range(op["params"].get("activation", "NONE"), tout.s, tout.z)
    return cache["mult"], cache["shift"], cache["act"]


def _conv2d_accumulator(graph, idx, op, x, w):
    """``(accumulate, cout)``: ``accumulate(weights)`` is the exact accumulator ``sum w (x - z_in)``
    of ``ConvPerChannel`` ([N, oh, ow, cout], float64 holding integers) for weights shaped like ``w``."""
    tin, tw = _ts(graph, op, 0), _ts(graph, op, 1)
    if tw.zero_point.size and np.any(tw.zero_point != 0):
        raise IntegerGraphError(f"op #{idx} CONV_2D: per-channel weights must have zero point 0")
    cout, kh, kw, cin_f = w.shape
    n, h, wd, cin = x.shape
    groups = cin // cin_f
    sh, sw, dh, dw, oh, ow, (pt, pb), (pl, pr) = _conv_geometry(x.shape, kh, kw, op["params"])
    xp = np.pad(x.astype(np.float64) - tin.z, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    per_group = cout // groups

    def accumulate(weights):
        wf = weights.astype(np.float64)
        acc = np.zeros((n, oh, ow, cout), np.float64)
        for ky, kx, patch in _taps(xp, kh, kw, sh, sw, dh, dw, oh, ow):
            if groups == 1:
                acc += patch @ wf[:, ky, kx, :].T
            else:
                for g in range(groups):
                    acc[..., g * per_group:(g + 1) * per_group] += (
                        patch[..., g * cin_f:(g + 1) * cin_f] @ wf[g * per_group:(g + 1) * per_group, ky, kx, :].T)
        return acc

    return accumulate, cout


def _reference_convolution(graph, idx, op, args, accumulator):
    """A convolution's reference output from ``accumulator`` (``_conv2d_accumulator`` or
    ``_depthwise_accumulator``): one requantized accumulator, or a kernel-parts op's exact sum."""
    x, w, b = args[0], args[1], args[2] if len(args) > 2 else None
    tout = _ts(graph, op, 0, out=True)
    accumulate, cout = accumulator(graph, idx, op, x, w)
    if op["params"].get("parts"):
        return [_parts_output(graph, idx, op, [accumulate(w)] + [accumulate(graph.constants[t])
                                                                  for t in op["params"]["parts"]], b, tout)]
    return [_conv_output(graph, idx, op, accumulate(w), b, cout, tout)]


@_kernel("CONV_2D")
def _k_conv2d(graph, idx, op, args):
    """``reference_integer_ops::ConvPerChannel`` (integer_ops/conv.h)."""
    return _reference_convolution(graph, idx, op, args, _conv2d_accumulator)


def _conv_output(graph, idx, op, acc, bias, cout, tout):
    """Shared tail of CONV_2D and DEPTHWISE_CONV_2D: int32 bias, per-channel requantisation."""
    acc = acc.astype(np.int64)
    if bias is not None:
        acc = acc + _i64(bias)
    mult, shift, (lo, hi) = _conv_multipliers(graph, idx, op, cout)
    return _output_stage(acc, mult, shift, tout.z, lo, hi)


#: fraction bits of the int32 bias of a kernel-parts op: stored at ``s_out * 2**-16`` per channel
#: (fewer where ``|bias| / s_out`` would reach ``2**30``)
PARTS_BIAS_FRACTION_BITS = 16
_INT64_BUDGET = float(2 ** 62)  # |sum_j acc_j m_j + bias m_b| stays below this (int64 with 2x margin)


PARTS_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def _output_channel_axis(op_name):
    return 3 if op_name == "DEPTHWISE_CONV_2D" else 0


def _part_scales(spec: TensorSpec, n_out):
    scale = spec.scale.astype(np.float64)
    return np.repeat(scale[:1], n_out) if scale.size == 1 else scale


def _parts_multipliers(graph, idx, op):
    """Integer multipliers of a kernel-parts op (module docstring, "Kernel parts"), per output
    channel ``c``: ``m_j = round(M_j 2^e)`` for each part ``j`` (``M_j = s_in s_j / s_out``) and
    ``m_b = round(s_b 2^e / s_out)`` for the bias, with the largest exponent ``e <= 62`` for which
    ``sum_j B_j (M_j 2^e + 1/2) + |b|(M_b 2^e + 1/2) + 2^(e-1) < 2^62``; ``B_j`` bounds
    ``|acc_j|`` (255 times the sum of ``|Q_j|`` over the channel), so the int64 sum never overflows."""
    cache = graph._op_cache(idx)
    if "parts_m" in cache:
        return cache
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    ids = [op["inputs"][1]] + list(op["params"]["parts"])
    axis = _output_channel_axis(op["op"])
    weights = [graph.constants[t] for t in ids]
    n_out = weights[0].shape[axis]
    s_in, s_out = float(np.float32(tin.s)), float(np.float32(tout.s))
    reals, bounds = [], []
    for t, w in zip(ids, weights):
        mag = np.moveaxis(np.abs(w.astype(np.float64)), axis, -1).reshape(-1, n_out)
        bounds.append(255.0 * mag.sum(axis=0))
        reals.append(s_in * _part_scales(graph.tensors[t], n_out) / s_out)
    reals, bounds = np.stack(reals), np.stack(bounds)          # [parts, n_out]
    b_id = op["inputs"][2] if len(op["inputs"]) > 2 else -1
    if b_id >= 0:
        bias = graph.constants[b_id].astype(np.int64).reshape(-1)
        bias_real = _part_scales(graph.tensors[b_id], n_out) / s_out
    else:
        bias, bias_real = np.zeros(n_out, np.int64), np.zeros(n_out)
    bias_bound = np.abs(bias).astype(np.float64)
    reals = np.where(bounds > 0, reals, 0.0)                   # an all-zero part channel adds nothing
    spread = (bounds * reals).sum(axis=0) + bias_bound * bias_real + 0.5
    slack = 0.5 * (bounds.sum(axis=0) + bias_bound)
    room = _INT64_BUDGET - slack
    if np.any(room <= 0):
        raise IntegerGraphError(f"op #{idx} {op['op']}: kernel parts too large for int64 accumulation")
    e = np.clip(np.floor(np.log2(room / spread)), 0, 62).astype(np.int64)
    cache["parts_m"] = np.round(reals * np.exp2(e)).astype(np.int64)
    cache["parts_mb"] = np.round(bias_real * np.exp2(e)).astype(np.int64)
    cache["parts_e"] = e
    cache["act"] = _activation_range(op["params"].get("activation", "NONE"), tout.s, tout.z)
    return cache


def _parts_output(graph, idx, op, accs, bias, tout):
    """Output stage of a kernel-parts op: ``total = sum_j acc_j m_j + b m_b`` in int64, one rounding
    ``round_half_away(total / 2^e)``, then ``+ z_out``, clamp to the fused activation, int8."""
    cache = _parts_multipliers(graph, idx, op)
    m, mb, e = cache["parts_m"], cache["parts_mb"], cache["parts_e"]
    total = np.zeros(np.shape(accs[0]), np.int64)
    for j, acc in enumerate(accs):
        total += np.asarray(acc).astype(np.int64) * m[j]
    if bias is not None:
        total += _i64(bias).reshape(-1) * mb
    half = (np.int64(1) << e) >> 1
    rounded = np.where(total >= 0, (total + half) >> e, -((half - total) >> e))
    lo, hi = cache["act"]
    return _to_int8(np.clip(rounded + tout.z, lo, hi))


def _depthwise_accumulator(graph, idx, op, x, w):
    """``(accumulate, cout)`` of ``DepthwiseConvPerChannel``, as ``_conv2d_accumulator``; output
    channel ``oc = ic * depth_multiplier + m``."""
    tin = _ts(graph, op, 0)
    _, kh, kw, cout = w.shape
    n, h, wd, cin = x.shape
    mult_d = op["params"].get("depth_multiplier", 0) or cout // cin
    if cin * mult_d != cout:
        raise IntegerGraphError(f"op #{idx} DEPTHWISE_CONV_2D: {cin} input channels x depth multiplier "
                                f"{mult_d} != {cout} output channels")
    sh, sw, dh, dw, oh, ow, (pt, pb), (pl, pr) = _conv_geometry(x.shape, kh, kw, op["params"])
    xp = np.pad(x.astype(np.float64) - tin.z, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    if mult_d > 1:
        xp = np.repeat(xp, mult_d, axis=3)

    def accumulate(weights):
        wf = weights.astype(np.float64)
        acc = np.zeros((n, oh, ow, cout), np.float64)
        for ky, kx, patch in _taps(xp, kh, kw, sh, sw, dh, dw, oh, ow):
            acc += patch * wf[0, ky, kx, :]
        return acc

    return accumulate, cout


@_kernel("DEPTHWISE_CONV_2D")
def _k_depthwise(graph, idx, op, args):
    """``reference_integer_ops::DepthwiseConvPerChannel`` (integer_ops/depthwise_conv.h)."""
    return _reference_convolution(graph, idx, op, args, _depthwise_accumulator)


def _fc_rows(graph, idx, op, x, depth):
    """FULLY_CONNECTED input as ``[rows, depth]`` float64 rows of ``x - z_in``."""
    if x.size % depth:
        raise IntegerGraphError(f"op #{idx} FULLY_CONNECTED: input size {x.size} is not a multiple of {depth}")
    return x.reshape(-1, depth).astype(np.float64) - _ts(graph, op, 0).z


def accumulator(graph, idx, op, tensors):
    """The exact accumulator ``sum w (x - z_in)`` (no bias) of op ``idx``, a CONV_2D,
    DEPTHWISE_CONV_2D or FULLY_CONNECTED, from ``tensors`` (ids -> arrays; constants from the graph):
    int64 values, output channels last."""
    x = tensors[op["inputs"][0]]
    w = graph.constants.get(op["inputs"][1], tensors.get(op["inputs"][1]))
    if op["op"] == "FULLY_CONNECTED":
        return _fc_accumulator(graph, op, _fc_rows(graph, idx, op, x, w.shape[1]), w, None)
    if op["op"] not in ("CONV_2D", "DEPTHWISE_CONV_2D"):
        raise IntegerGraphError(f"op #{idx} {op['op']} has no weight accumulator")
    build = _conv2d_accumulator if op["op"] == "CONV_2D" else _depthwise_accumulator
    accumulate, _ = build(graph, idx, op, x, w)
    return accumulate(w).astype(np.int64)


def accumulator_steps(graph, op, n_out):
    """Real value of one accumulator unit of a weighted op, per output channel: ``s_in * s_w[c]``
    (float64 of the float32 scales)."""
    s_w = graph.tensors[op["inputs"][1]].scale.astype(np.float64)
    return np.float64(graph.tensors[op["inputs"][0]].s) * (s_w if s_w.size > 1 else np.repeat(s_w, n_out))


def _fc_accumulator(graph, op, x2, w, b):
    """int32 accumulator ``sum (w - z_w)(x - z_in) + bias`` of FULLY_CONNECTED ([rows, units], int64
    holding int32 values); ``z_w`` is applied for per-tensor weights only, as in TFLite."""
    tw = _ts(graph, op, 1)
    wf = w.astype(np.float64)
    if tw.scale.size <= 1 and tw.z != 0:
        wf = wf - tw.z
    acc = (x2 @ wf.T).astype(np.int64)
    if b is not None:
        acc = acc + _i64(b)
    return _wrap32(acc)


@_kernel("FULLY_CONNECTED")
def _k_fully_connected(graph, idx, op, args):
    """``reference_integer_ops::FullyConnected`` / ``FullyConnectedPerChannel``
    (integer_ops/fully_connected.h), the overloads taking the float scales that fully_connected.cc
    calls with the reference kernel: ``acc = sum (w - z_w)(x - z_in) + bias`` in int32, then
    ``round(double(acc) * s_in * s_w / s_out)`` in double precision, halves away from zero (no
    fixed-point multiplier).  ``z_w`` is applied for per-tensor weights only, as in TFLite."""
    x, w, b = args[0], args[1], args[2] if len(args) > 2 else None
    tin, tw, tout = _ts(graph, op, 0), _ts(graph, op, 1), _ts(graph, op, 0, out=True)
    p = op["params"]
    units, depth = w.shape
    x2 = _fc_rows(graph, idx, op, x, depth)
    if p.get("parts"):
        accs = [x2 @ part.astype(np.float64).T for part in [w] + [graph.constants[t] for t in p["parts"]]]
        y = _parts_output(graph, idx, op, accs, b, tout)
        return [y.reshape(tuple(x.shape[:-1]) + (units,)) if p.get("keep_num_dims", False) else y]
    per_channel = tw.scale.size > 1
    acc = _fc_accumulator(graph, op, x2, w, b)
    cache = graph._op_cache(idx)
    if "act" not in cache:
        cache["act"] = _activation_range(p.get("activation", "NONE"), tout.s, tout.z)
        scales = tw.scale if per_channel else np.repeat(tw.scale[:1], units)
        cache["eff"] = np.array([float(np.float32(tin.s)) * float(s) / float(np.float32(tout.s))
                                 for s in scales], dtype=np.float64)
    lo, hi = cache["act"]
    scaled = _round_half_away(acc.astype(np.float64) * cache["eff"])
    out = np.clip(scaled, INT32_MIN, INT32_MAX).astype(np.int64) + tout.z
    y = _to_int8(np.clip(out, lo, hi))
    if p.get("keep_num_dims", False):
        y = y.reshape(tuple(x.shape[:-1]) + (units,))
    return [y]


def _add_sub(graph, idx, op, args, sign):
    """``reference_integer_ops::AddFunc`` (integer_ops/add.h) and the int8 SUB kernel
    (reference_ops Sub/BroadcastQuantSubSlow): inputs rescaled with left_shift=20 and per-input
    multipliers, summed, then rescaled by the output multiplier (add.cc / sub.cc Prepare)."""
    t1, t2, tout = _ts(graph, op, 0), _ts(graph, op, 1), _ts(graph, op, 0, out=True)
    cache = graph._op_cache(idx)
    if "m1" not in cache:
        left_shift = 20
        twice_max = 2.0 * float(max(np.float32(t1.s), np.float32(t2.s)))
        r1 = float(np.float32(t1.s)) / twice_max
        r2 = float(np.float32(t2.s)) / twice_max
        ro = twice_max / (float(1 << left_shift) * float(np.float32(tout.s)))
        cache["left_shift"] = left_shift
        cache["m1"], cache["s1"] = quantize_multiplier(r1)
        cache["m2"], cache["s2"] = quantize_multiplier(r2)
        cache["mo"], cache["so"] = quantize_multiplier(ro)
        if max(cache["s1"], cache["s2"], cache["so"]) > 0:
            raise IntegerGraphError(f"op #{idx} {op['op']}: multipliers must be smaller than one")
        cache["act"] = _activation_range(op["params"].get("activation", "NONE"), tout.s, tout.z)
    a = _wrap32((_i64(args[0]) - t1.z) << cache["left_shift"])
    b = _wrap32((_i64(args[1]) - t2.z) << cache["left_shift"])
    sa = _mbqm_smaller_than_one_exp(a, cache["m1"], cache["s1"])
    sb = _mbqm_smaller_than_one_exp(b, cache["m2"], cache["s2"])
    raw = _wrap32(sa + sign * sb)
    out = _mbqm_smaller_than_one_exp(raw, cache["mo"], cache["so"]) + tout.z
    lo, hi = cache["act"]
    return [_to_int8(np.clip(out, lo, hi))]


def _register_add_sub(register, add_sub):
    """Register ``add_sub(graph, idx, op, args, sign)`` as the ADD (sign 1) and SUB (-1) kernels."""
    for name, sign in (("ADD", 1), ("SUB", -1)):
        register(name)(lambda graph, idx, op, args, sign=sign: add_sub(graph, idx, op, args, sign))


_register_add_sub(_kernel, _add_sub)


@_kernel("MUL")
def _k_mul(graph, idx, op, args):
    """``reference_integer_ops::MulElementwise``/``BroadcastMul6DSlow`` (integer_ops/mul.h); the
    multiplier is ``s1 * s2 / s_out`` computed in float32 (mul.cc Prepare)."""
    t1, t2, tout = _ts(graph, op, 0), _ts(graph, op, 1), _ts(graph, op, 0, out=True)
    cache = graph._op_cache(idx)
    if "m" not in cache:
        real = float(np.float32(np.float32(t1.s) * np.float32(t2.s)) / np.float32(tout.s))
        cache["m"], cache["s"] = quantize_multiplier(real)
        cache["act"] = _activation_range(op["params"].get("activation", "NONE"), tout.s, tout.z)
    prod = _wrap32((_i64(args[0]) - t1.z) * (_i64(args[1]) - t2.z))
    out = multiply_by_quantized_multiplier(prod, cache["m"], cache["s"]) + tout.z
    lo, hi = cache["act"]
    return [_to_int8(np.clip(out, lo, hi))]


@_kernel("MAXIMUM", "MINIMUM")
def _k_max_min(graph, idx, op, args):
    """``reference_ops::MaximumMinimumBroadcastSlow``: elementwise max/min of the raw int8 values,
    no rescaling (maximum_minimum.cc), so all operands must share the output quantization."""
    tout = _ts(graph, op, 0, out=True)
    for i in range(2):
        t = _ts(graph, op, i)
        if t.dtype == "int8" and (t.s != tout.s or t.z != tout.z):
            raise IntegerGraphError(
                f"op #{idx} {op['op']}: input {i} quantization ({t.s}, {t.z}) differs from the output "
                f"({tout.s}, {tout.z}); TFLite does not rescale here")
    fn = np.maximum if op["op"] == "MAXIMUM" else np.minimum
    return [fn(args[0], args[1]).astype(tout.dtype)]


@_kernel("CONCATENATION")
def _k_concat(graph, idx, op, args):
    """``reference_ops::Concatenation``; int8 inputs must share the output scale and zero point
    (concatenation.cc Prepare), so no rescaling happens."""
    tout = _ts(graph, op, 0, out=True)
    if tout.dtype == "int8":
        for i in range(len(args)):
            t = _ts(graph, op, i)
            if t.s != tout.s or t.z != tout.z:
                raise IntegerGraphError(
                    f"op #{idx} CONCATENATION: input {i} has scale/zero point ({t.s}, {t.z}) different "
                    f"from the output ({tout.s}, {tout.z}); TFLite int8 concatenation does not rescale")
    axis = op["params"].get("axis", 0)
    if op["params"].get("activation", "NONE") != "NONE":
        raise UnsupportedOpError(f"op #{idx} CONCATENATION with a fused activation is not supported")
    arrs = [np.atleast_1d(a) for a in args]
    if axis < 0:
        axis += arrs[0].ndim
    return [np.concatenate(arrs, axis=axis).astype(tout.dtype)]


def _pool(graph, idx, op, args, kind):
    x = args[0]
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    p = op["params"]
    kh, kw = p["filter_h"], p["filter_w"]
    sh, sw = p.get("stride_h", 1), p.get("stride_w", 1)
    oh, pt, pb = _padding_amounts(p.get("padding", "VALID"), x.shape[1], kh, sh)
    ow, pl, pr = _padding_amounts(p.get("padding", "VALID"), x.shape[2], kw, sw)
    lo, hi = _activation_range(p.get("activation", "NONE"), tout.s, tout.z)
    pads = ((0, 0), (pt, pb), (pl, pr), (0, 0))
    if kind == "max":
        xp = np.pad(_i64(x), pads, constant_values=np.iinfo(np.int64).min)
        out = None
        for _, _, patch in _taps(xp, kh, kw, sh, sw, 1, 1, oh, ow):
            out = patch.copy() if out is None else np.maximum(out, patch)
        return [_to_int8(np.clip(out, lo, hi))]
    if tin.s != tout.s or tin.z != tout.z:
        raise IntegerGraphError(f"op #{idx} AVERAGE_POOL_2D: input and output quantization differ")
    xp = np.pad(_i64(x), pads)
    valid = np.pad(np.ones((1,) + x.shape[1:3] + (1,), np.int64), pads)
    acc = np.zeros((x.shape[0], oh, ow, x.shape[3]), np.int64)
    cnt = np.zeros((1, oh, ow, 1), np.int64)
    for (ky, kx, patch), (_, _, vp) in zip(_taps(xp, kh, kw, sh, sw, 1, 1, oh, ow),
                                           _taps(valid, kh, kw, sh, sw, 1, 1, oh, ow)):
        acc += patch
        cnt += vp
    half = cnt // 2
    # (acc +/- count/2) / count with C truncation toward zero
    num = np.where(acc > 0, acc + half, acc - half)
    q = np.sign(num) * (np.abs(num) // cnt)
    return [_to_int8(np.clip(q, lo, hi))]


@_kernel("MAX_POOL_2D")
def _k_maxpool(graph, idx, op, args):
    """``reference_integer_ops::MaxPool`` (integer_ops/pooling.h)."""
    return _pool(graph, idx, op, args, "max")


@_kernel("AVERAGE_POOL_2D")
def _k_avgpool(graph, idx, op, args):
    """``reference_integer_ops::AveragePool`` (integer_ops/pooling.h): sum over the valid taps,
    divided by their count rounding half away from zero."""
    return _pool(graph, idx, op, args, "avg")


def _axes(axis_arr, ndim):
    axes = []
    for a in np.atleast_1d(axis_arr).astype(int).tolist():
        a = a + ndim if a < 0 else a
        if a not in axes:
            axes.append(a)
    return tuple(axes)


@_kernel("MEAN")
def _k_mean(graph, idx, op, args):
    """``reference_ops::QuantizedMeanOrSum`` (reference/reduce.h) with the multiplier of reduce.cc
    ``PrepareMeanOrSum`` (``s_in / s_out``) folded with ``1/num_elements`` as the kernel does."""
    x, axis = args[0], args[1]
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    axes = _axes(axis, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    total = _wrap32(_i64(x).sum(axis=axes, keepdims=op["params"].get("keep_dims", False)))
    cache = graph._op_cache(idx).setdefault(n, {})
    if "m" not in cache:
        m, s = quantize_multiplier(float(np.float32(tin.s)) / float(np.float32(tout.s)))
        shift = 63 - (64 - int(n).bit_length())  # 63 - CountLeadingZeros(uint64(n))
        shift = min(shift, 32, 31 + s)
        cache["m"] = int((m << shift) // n) if shift >= 0 else int((m >> -shift) // n)
        cache["s"] = s - shift
    shifted = _wrap32(total - tin.z * n)
    out = multiply_by_quantized_multiplier(shifted, cache["m"], cache["s"]) + tout.z
    return [_to_int8(np.clip(out, -128, 127))]


def _batched_reshape(x, shape):
    shape = [int(s) for s in shape]
    try:
        return x.reshape(shape)
    except ValueError:
        if shape and x.ndim and (shape[0] == 1 or shape[0] == -1):
            return x.reshape([x.shape[0]] + shape[1:])
        raise


@_kernel("RESHAPE")
def _k_reshape(graph, idx, op, args):
    """``RESHAPE``: a copy; the target shape comes from the shape tensor or the options. A leading 1
    in a constant target shape follows the actual batch size."""
    x = args[0]
    if len(args) > 1 and args[1] is not None and np.asarray(args[1]).ndim == 1:
        shape = np.asarray(args[1]).tolist()
    else:
        shape = op["params"].get("new_shape", list(_ts(graph, op, 0, out=True).shape))
    return [_batched_reshape(x, shape)]


@_kernel("SQUEEZE")
def _k_squeeze(graph, idx, op, args):
    dims = op["params"].get("squeeze_dims") or None
    x = args[0]
    if dims:
        return [np.squeeze(x, axis=tuple(d + x.ndim if d < 0 else d for d in dims))]
    keep = list(_ts(graph, op, 0, out=True).shape)
    return [_batched_reshape(x, keep)]


@_kernel("EXPAND_DIMS")
def _k_expand_dims(graph, idx, op, args):
    axis = int(np.asarray(args[1]).reshape(-1)[0])
    return [np.expand_dims(args[0], axis if axis >= 0 else axis + args[0].ndim + 1)]


@_kernel("PAD", "PADV2")
def _k_pad(graph, idx, op, args):
    """``reference_ops::Pad``: int8 PAD fills with the output zero point, PADV2 with its constant."""
    x, pads = args[0], np.asarray(args[1]).astype(int)
    tout = _ts(graph, op, 0, out=True)
    if op["op"] == "PADV2" and len(args) > 2 and args[2] is not None:
        value = int(np.asarray(args[2]).reshape(-1)[0])
    else:
        value = tout.z if tout.dtype == "int8" else 0
    return [np.pad(x, [tuple(r) for r in pads], constant_values=value).astype(x.dtype)]


@_kernel("QUANTIZE")
def _k_quantize(graph, idx, op, args):
    """float -> int8: ``reference_ops::AffineQuantize`` (round(x / scale) in float32, halves away from
    zero); int8 -> int8: ``reference_ops::Requantize`` with the multiplier ``s_in / s_out`` (quantize.cc)."""
    x = args[0]
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    if tout.scale.size > 1:
        raise UnsupportedOpError(f"op #{idx} QUANTIZE to a per-channel tensor is not supported")
    if tin.dtype == "float32":
        v = (np.asarray(x, np.float32) / np.float32(tout.s)).astype(np.float32)
        q = _round_half_away(v) + tout.z
        return [_to_int8(np.clip(q, -128, 127))]
    if tin.dtype not in ("int8", "uint8", "int16"):
        raise IntegerGraphError(f"op #{idx} QUANTIZE from {tin.dtype} is not supported")
    cache = graph._op_cache(idx)
    if "m" not in cache:
        cache["m"], cache["s"] = quantize_multiplier(float(np.float32(tin.s)) / float(np.float32(tout.s)))
    out = multiply_by_quantized_multiplier(_i64(x) - tin.z, cache["m"], cache["s"]) + tout.z
    return [_to_int8(np.clip(out, -128, 127))]


@_kernel("DEQUANTIZE")
def _k_dequantize(graph, idx, op, args):
    """``reference_ops::Dequantize``: ``float(double(scale) * (q - zero_point))``."""
    tin = _ts(graph, op, 0)
    if tin.scale.size > 1:
        raise UnsupportedOpError(f"op #{idx} DEQUANTIZE of a per-channel tensor is not supported")
    return [(float(np.float32(tin.s)) * (_i64(args[0]) - tin.z).astype(np.float64)).astype(np.float32)]


@_kernel("LOGISTIC", "TANH")
def _k_lut(graph, idx, op, args):
    """int8 LOGISTIC/TANH: with the reference (and generic optimized) kernel the int8 path is a
    256-entry lookup table built by ``LUTPopulate<int8_t>`` in ``SigmoidPrepare``/``TanhPrepare``
    (activations.cc), indexed by the input value."""
    table = op["params"].get("table")
    if table is None:
        table = _make_table(op["op"], _ts(graph, op, 0), _ts(graph, op, 0, out=True))
        op["params"]["table"] = table
    lut = np.asarray(table, dtype=np.int8)
    return [lut[_i64(args[0]) + 128]]


def _relu_like(graph, idx, op, args, act_min, act_max):
    """``QuantizedReluX`` + ``ReluX`` (activations.cc): requantize with ``float(s_in / s_out)`` and clamp
    to ``[zp + roundf(min / s_out), zp + roundf(max / s_out)]``."""
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    cache = graph._op_cache(idx)
    if "m" not in cache:
        cache["m"], cache["s"] = quantize_multiplier(float(np.float32(tin.s) / np.float32(tout.s)))
        lo = max(-128, _quantize_scalar(act_min, tout.s, tout.z))
        hi = 127 if act_max is None else min(127, _quantize_scalar(act_max, tout.s, tout.z))
        cache["act"] = (lo, hi)
    out = tout.z + multiply_by_quantized_multiplier(_i64(args[0]) - tin.z, cache["m"], cache["s"])
    lo, hi = cache["act"]
    return [_to_int8(np.clip(out, lo, hi))]


@_kernel("RELU")
def _k_relu(graph, idx, op, args):
    return _relu_like(graph, idx, op, args, 0.0, None)


@_kernel("RELU6")
def _k_relu6(graph, idx, op, args):
    return _relu_like(graph, idx, op, args, 0.0, 6.0)


@_kernel("RELU_N1_TO_1")
def _k_relu1(graph, idx, op, args):
    return _relu_like(graph, idx, op, args, -1.0, 1.0)


@_kernel("RELU_0_TO_1")
def _k_relu01(graph, idx, op, args):
    return _relu_like(graph, idx, op, args, 0.0, 1.0)


@_kernel("LEAKY_RELU")
def _k_leaky_relu(graph, idx, op, args):
    """``reference_ops::QuantizeLeakyRelu``: identity multiplier ``float(s_in/s_out)`` for x >= z_in,
    alpha multiplier ``float(s_in*alpha/s_out)`` below (activations.cc LeakyReluPrepare)."""
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    cache = graph._op_cache(idx)
    if "mi" not in cache:
        alpha = np.float32(op["params"].get("alpha", 0.2))
        cache["ma"], cache["sa"] = quantize_multiplier(
            float(np.float32(np.float32(tin.s) * alpha) / np.float32(tout.s)))
        cache["mi"], cache["si"] = quantize_multiplier(float(np.float32(tin.s) / np.float32(tout.s)))
    v = _i64(args[0]) - tin.z
    pos = multiply_by_quantized_multiplier(v, cache["mi"], cache["si"])
    neg = multiply_by_quantized_multiplier(v, cache["ma"], cache["sa"])
    out = tout.z + np.where(v >= 0, pos, neg)
    return [_to_int8(np.clip(out, -128, 127))]


@_kernel("HARD_SWISH")
def _k_hard_swish(graph, idx, op, args):
    """``reference_ops::HardSwish`` for int8 (reference/hard_swish.h) with the int16 fixed-point
    parameters of ``HardSwishPrepare`` (activations.cc)."""
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    cache = graph._op_cache(idx)
    if "om" not in cache:
        hires = np.float32(np.float32(1.0 / 128.0) * np.float32(tin.s))
        out_mult = np.float32(hires / np.float32(tout.s))
        reluish_mult = np.float32(hires / np.float32(np.float32(3.0) / np.float32(32768.0)))
        m, e = quantize_multiplier(float(out_mult))
        cache["om"], cache["oe"] = _downscale_multiplier_to_int16(m), e
        m, e = quantize_multiplier(float(reluish_mult))
        cache["rm"], cache["re"] = _downscale_multiplier_to_int16(m), e
        if cache["oe"] > 0:
            raise IntegerGraphError(f"op #{idx} HARD_SWISH: output multiplier exponent must be <= 0")
    v = _wrap16(_i64(args[0]) - tin.z)
    hires_v = _wrap16(v * (1 << 7))
    preshift_out = _srdhm16(hires_v, cache["om"])
    reluish = hires_v
    re = cache["re"]
    if re > 0:
        reluish = _saturating_left_shift16(reluish, re - 1)
    reluish = _srdhm16(reluish, cache["rm"])
    if re > 0:
        reluish = _saturating_left_shift16(reluish, 1)
    if re < 0:
        reluish = rounding_divide_by_pot(reluish, -re)
    reluish = (reluish + (1 << 15)) >> 1
    pre = _sdhm16(reluish, preshift_out)
    out = _wrap16(rounding_divide_by_pot(pre, -cache["oe"]) + tout.z)
    return [_to_int8(np.clip(out, -128, 127))]


@_kernel("SOFTMAX")
def _k_softmax(graph, idx, op, args):
    """int8 -> int8 ``reference_ops::Softmax`` (reference/softmax.h): gemmlowp fixed-point exp of the
    input differences in Q5.26, Q12.19 accumulation, ``GetReciprocal`` (common.h), output on the
    1/256 grid with zero point -128.  Parameters from ``PreprocessSoftmaxScaling`` (quantization_util.cc)."""
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    if tout.z != -128 or abs(tout.s - 1 / 256) > 0.001 / 256:
        raise IntegerGraphError(f"op #{idx} SOFTMAX: int8 output must have scale 1/256 and zero point -128")
    cache = graph._op_cache(idx)
    if "m" not in cache:
        beta = float(np.float32(op["params"].get("beta", 1.0)))
        real = min(beta * float(np.float32(tin.s)) * float(1 << 26), float((1 << 31) - 1))
        m, left = quantize_multiplier(real)
        if left < 0:
            raise IntegerGraphError(f"op #{idx} SOFTMAX: input multiplier below one is not supported")
        radius = math.floor(1.0 * ((1 << 5) - 1) * float(1 << (31 - 5)) / float(1 << left))
        cache["m"], cache["left"], cache["diff_min"] = m, left, -int(radius)
    x = _i64(args[0])
    diff = x - x.max(axis=-1, keepdims=True)
    use = diff >= cache["diff_min"]
    rescaled = saturating_rounding_doubling_high_mul(_wrap32(diff << cache["left"]), cache["m"])
    exps = _exp_on_negative_values_q5_26(rescaled)
    contrib = np.where(use, rounding_divide_by_pot(exps, 12), 0)
    sum_of_exps = _wrap32(contrib.sum(axis=-1, keepdims=True))
    headroom = _count_leading_zeros32(sum_of_exps)
    num_bits_over_unit = 12 - headroom
    shifted_minus_one = _wrap32(((sum_of_exps & 0xFFFFFFFF) << headroom) - (1 << 31))
    shifted_scale = _one_over_one_plus_x_for_x_in_0_1(shifted_minus_one)
    exponent = num_bits_over_unit + 31 - 8
    unsat = rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted_scale, exps), exponent)
    out = np.where(use, np.clip(unsat - 128, -128, 127), -128)
    return [_to_int8(out)]


# ---- int32 shape arithmetic emitted around FULLY_CONNECTED on >2-D inputs --------------------------

@_kernel("SHAPE")
def _k_shape(graph, idx, op, args):
    return [np.array(np.shape(args[0]), dtype=_ts(graph, op, 0, out=True).dtype)]


@_kernel("GATHER")
def _k_gather(graph, idx, op, args):
    """``GATHER``: a pure data move (used on int32 shape vectors by the converter)."""
    axis = op["params"].get("axis", 0)
    return [np.take(args[0], np.asarray(args[1]).astype(np.int64), axis=axis)]


@_kernel("REDUCE_PROD")
def _k_reduce_prod(graph, idx, op, args):
    t = _ts(graph, op, 0)
    if t.quantized:
        raise UnsupportedOpError(f"op #{idx} REDUCE_PROD on quantized tensors is not supported")
    axes = _axes(args[1], np.ndim(args[0]))
    r = np.prod(np.asarray(args[0]).astype(np.int64), axis=axes, keepdims=op["params"].get("keep_dims", False))
    return [np.asarray(r).astype(_ts(graph, op, 0, out=True).dtype)]


@_kernel("PACK")
def _k_pack(graph, idx, op, args):
    axis = op["params"].get("axis", 0)
    return [np.stack([np.asarray(a) for a in args], axis=axis).astype(_ts(graph, op, 0, out=True).dtype)]


@_kernel("STRIDED_SLICE")
def _k_strided_slice(graph, idx, op, args):
    """Plain-indexing STRIDED_SLICE (begin/end masks and shrink axis; no ellipsis/new axis)."""
    p = op["params"]
    if p.get("ellipsis_mask", 0) or p.get("new_axis_mask", 0) or p.get("offset", False):
        raise UnsupportedOpError(f"op #{idx} STRIDED_SLICE with ellipsis/new-axis/offset is not supported")
    x = np.asarray(args[0])
    begin, end, strides = (np.asarray(a).astype(int).tolist() for a in args[1:4])
    sl, squeeze = [], []
    for d in range(len(begin)):
        b = None if (p.get("begin_mask", 0) >> d) & 1 else begin[d]
        e = None if (p.get("end_mask", 0) >> d) & 1 else end[d]
        if (p.get("shrink_axis_mask", 0) >> d) & 1:
            b = begin[d]
            e = b + 1 if b != -1 else None
            squeeze.append(d)
        sl.append(slice(b, e, strides[d]))
    y = x[tuple(sl)]
    if squeeze:
        y = np.squeeze(y, axis=tuple(squeeze))
    return [y]


# ----------------------------------------------------------------------------------------------
# XNNPACK arithmetic (``run(..., arithmetic="xnnpack")``, module docstring "XNNPACK arithmetic").
# Kernels for the int8 ops LiteRT 2.3's XNNPACK delegate runs with arithmetic of its own; every
# float32 product and quotient is rounded to float32 as XNNPACK's C code does, ``_xnn_round`` is
# its magic-bias / ``lrintf`` rounding (halves to even).
# ----------------------------------------------------------------------------------------------

ARITHMETICS = ("reference", "xnnpack")
_F32 = np.float32
_XNNPACK_KERNELS: Dict[str, Any] = {}
_xnnpack_kernel = _registrar(_XNNPACK_KERNELS)


def _check_arithmetic(arithmetic):
    if not isinstance(arithmetic, str) or arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {', '.join(repr(a) for a in ARITHMETICS)}; "
                         f"got {arithmetic!r}")


def _f32_ratio(numerator, denominator):
    return _F32(_F32(numerator) / _F32(denominator))


def _in_range(value, low, high, high_inclusive=False):
    value = abs(float(value))
    return low <= value and (value <= high if high_inclusive else value < high)


def _xnnpack_runs(graph, op) -> bool:
    """Whether LiteRT 2.3's XNNPACK delegate takes ``op`` (one of the ops of ``_XNNPACK_KERNELS``).
    The scale limits are the ones its XNNPACK operators accept; outside them the op stays in the
    builtin kernels (measured at the boundaries with one-op models)."""
    name = op["op"]
    if op["params"].get("parts"):
        return False  # kernel-parts ops are an IntegerGraph extension with exact arithmetic
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    if name in PARTS_OPS:
        tw = _ts(graph, op, 1)
        return tw.dtype == "int8" and not np.any(tw.zero_point != 0)
    if name in ("ADD", "SUB"):
        return all(_in_range(_f32_ratio(_ts(graph, op, i).s, tout.s), 2.0 ** -10, 2.0 ** 8) for i in (0, 1))
    if name == "MUL":
        t2 = _ts(graph, op, 1)
        return _in_range(_f32_ratio(_F32(tin.s) * _F32(t2.s), tout.s), 2.0 ** -16, 2.0 ** 8)
    if name == "MEAN":
        return True
    if name == "QUANTIZE":
        if tin.dtype == "float32":
            return True
        return tin.dtype == "int8" and _in_range(_f32_ratio(tin.s, tout.s), 2.0 ** -8, 2.0 ** 7, True)
    if name == "LEAKY_RELU":
        ratio = _f32_ratio(tin.s, tout.s)
        negative = _F32(_F32(op["params"].get("alpha", 0.2)) * ratio)
        return (_in_range(ratio, 2.0 ** -8, 2.0 ** 7, True)
                and _in_range(negative, 2.0 ** -8, 2.0 ** 7, True))
    return False


def _xnn_round(v):
    """float32 values rounded half to even, as int64 (saturated far outside the int32 range)."""
    return np.rint(np.clip(np.asarray(v, np.float32), -2.0 ** 40, 2.0 ** 40)).astype(np.int64)


def _xnn_requantize(acc, scale, out_zp, lo, hi):
    """XNNPACK's fp32 requantization: ``clamp(round(float32(acc) * scale) + z_out, lo, hi)``, the
    product in float32."""
    v = (np.asarray(acc, np.int64).astype(np.float32) * np.asarray(scale, np.float32)).astype(np.float32)
    return _to_int8(np.clip(_xnn_round(v) + out_zp, lo, hi))


def _xnn_weighted_output(graph, idx, op, acc, bias, n_out):
    """Output stage of XNNPACK's qs8/qc8w convolution and fully-connected operators: int32
    accumulator (+ bias), per-channel scale ``float32(float32(s_in * s_w[c]) / s_out)``."""
    cache = graph._op_cache(idx)
    if "xnn_scale" not in cache:
        tin, tw, tout = _ts(graph, op, 0), _ts(graph, op, 1), _ts(graph, op, 0, out=True)
        sw = tw.scale if tw.scale.size > 1 else np.repeat(tw.scale[:1], n_out)
        cache["xnn_scale"] = ((_F32(tin.s) * sw.astype(np.float32)).astype(np.float32)
                              / _F32(tout.s)).astype(np.float32)
        cache["xnn_act"] = _activation_range(op["params"].get("activation", "NONE"), tout.s, tout.z)
    acc = np.asarray(acc).astype(np.int64)
    if bias is not None:
        acc = acc + _i64(bias)
    lo, hi = cache["xnn_act"]
    return _xnn_requantize(_wrap32(acc), cache["xnn_scale"], _ts(graph, op, 0, out=True).z, lo, hi)


@_xnnpack_kernel("CONV_2D")
def _x_conv2d(graph, idx, op, args):
    """XNNPACK ``qs8_qc8w`` convolution: the reference accumulator, ``_xnn_weighted_output``."""
    x, w, b = args[0], args[1], args[2] if len(args) > 2 else None
    accumulate, cout = _conv2d_accumulator(graph, idx, op, x, w)
    return [_xnn_weighted_output(graph, idx, op, accumulate(w), b, cout)]


@_xnnpack_kernel("DEPTHWISE_CONV_2D")
def _x_depthwise(graph, idx, op, args):
    """XNNPACK ``qs8_qc8w`` depthwise convolution: the reference accumulator, ``_xnn_weighted_output``."""
    x, w, b = args[0], args[1], args[2] if len(args) > 2 else None
    accumulate, cout = _depthwise_accumulator(graph, idx, op, x, w)
    return [_xnn_weighted_output(graph, idx, op, accumulate(w), b, cout)]


@_xnnpack_kernel("FULLY_CONNECTED")
def _x_fully_connected(graph, idx, op, args):
    """XNNPACK ``qs8`` / ``qs8_qc8w`` fully connected: the reference int32 accumulator,
    ``_xnn_weighted_output`` (per-tensor weights use their one scale for every unit)."""
    x, w, b = args[0], args[1], args[2] if len(args) > 2 else None
    units, depth = w.shape
    acc = _fc_accumulator(graph, op, _fc_rows(graph, idx, op, x, depth), w, b)
    y = _xnn_weighted_output(graph, idx, op, acc, None, units)
    if op["params"].get("keep_num_dims", False):
        y = y.reshape(tuple(x.shape[:-1]) + (units,))
    return [y]


@_xnnpack_kernel("MUL")
def _x_mul(graph, idx, op, args):
    """XNNPACK ``qs8_vmul`` (fp32): ``round(float32((a - z_a)(b - z_b)) * M) + z_out`` with
    ``M = float32(float32(s_a s_b) / s_out)``, clamped to the fused activation range."""
    t1, t2, tout = _ts(graph, op, 0), _ts(graph, op, 1), _ts(graph, op, 0, out=True)
    cache = graph._op_cache(idx)
    if "xnn_m" not in cache:
        cache["xnn_m"] = _f32_ratio(_F32(t1.s) * _F32(t2.s), tout.s)
        cache["xnn_act"] = _activation_range(op["params"].get("activation", "NONE"), tout.s, tout.z)
    prod = (_i64(args[0]) - t1.z) * (_i64(args[1]) - t2.z)
    lo, hi = cache["xnn_act"]
    return [_xnn_requantize(prod, cache["xnn_m"], tout.z, lo, hi)]


def _xnn_add_sub(graph, idx, op, args, sign):
    """XNNPACK ``qs8_vadd`` (SUB: the second multiplier negated), all in int32:
    ``((bias + a m_a + b m_b) >> k) + z_out`` with ``r_i = float32(s_i / s_out)``,
    ``k = 20 - floor(log2(max |r_i|))``, ``m_i = round(r_i 2^k)``, ``bias = 2^(k-1) - m_a z_a - m_b z_b``
    (so halves round up), clamped to the fused activation range."""
    t1, t2, tout = _ts(graph, op, 0), _ts(graph, op, 1), _ts(graph, op, 0, out=True)
    cache = graph._op_cache(idx)
    if "xnn_ma" not in cache:
        ra = _f32_ratio(t1.s, tout.s)
        rb = _F32(sign * _f32_ratio(t2.s, tout.s))
        shift = 20 - (int(np.frexp(max(abs(ra), abs(rb)))[1]) - 1)
        ma = int(np.rint(np.ldexp(ra, shift)))
        mb = int(np.rint(np.ldexp(rb, shift)))
        cache["xnn_ma"], cache["xnn_mb"], cache["xnn_shift"] = ma, mb, shift
        cache["xnn_bias"] = (1 << (shift - 1)) - ma * t1.z - mb * t2.z
        cache["xnn_act"] = _activation_range(op["params"].get("activation", "NONE"), tout.s, tout.z)
    acc = cache["xnn_bias"] + _i64(args[0]) * cache["xnn_ma"] + _i64(args[1]) * cache["xnn_mb"]
    lo, hi = cache["xnn_act"]
    return [_to_int8(np.clip((acc >> cache["xnn_shift"]) + tout.z, lo, hi))]


_register_add_sub(_xnnpack_kernel, _xnn_add_sub)


@_xnnpack_kernel("MEAN")
def _x_mean(graph, idx, op, args):
    """XNNPACK ``mean_nd_qs8``: the int32 sum of the raw codes, then in float32
    ``round(float32(sum) * M + float32(z_out - float32(n z_in) * M))`` with
    ``M = float32(s_in / s_out) * float32(1 / n)``: both zero points enter in float32 before the
    rounding (so ties follow the parity of ``z_out``, unlike ``round(...) + z_out``)."""
    x, axis = args[0], args[1]
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    axes = _axes(axis, x.ndim)
    n = int(np.prod([x.shape[a] for a in axes])) if axes else 1
    scale = _F32(_f32_ratio(tin.s, tout.s) * _F32(_F32(1.0) / _F32(n)))
    offset = _F32(_F32(tout.z) - _F32(_F32(n * tin.z) * scale))
    total = _i64(x).sum(axis=axes, keepdims=op["params"].get("keep_dims", False)).astype(np.float32)
    v = ((total * scale).astype(np.float32) + offset).astype(np.float32)
    return [_to_int8(np.clip(_xnn_round(v), -128, 127))]


def _xnn_fixed8(v, multiplier, out_zp):
    """XNNPACK's 8-bit fixed-point requantization of ``qs8_vcvt`` / ``qs8_vlrelu``:
    ``(256 z_out + 128 + v * multiplier) >> 8`` (halves round up), clamped to int8."""
    return _to_int8(np.clip(((out_zp << 8) + 0x80 + v * multiplier) >> 8, -128, 127))


@_xnnpack_kernel("QUANTIZE")
def _x_quantize(graph, idx, op, args):
    """float -> int8: XNNPACK ``f32_qs8_vcvt``, ``round(x * float32(1 / s)) + z``; int8 -> int8:
    ``qs8_vcvt`` with ``m = round(256 float32(s_in / s_out))`` on ``x - z_in`` (``_xnn_fixed8``)."""
    x = args[0]
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    if tin.dtype == "float32":
        v = (np.asarray(x, np.float32) * _F32(_F32(1.0) / _F32(tout.s))).astype(np.float32)
        return [_to_int8(np.clip(_xnn_round(v) + tout.z, -128, 127))]
    multiplier = int(np.rint(_F32(256.0) * _f32_ratio(tin.s, tout.s)))
    return [_xnn_fixed8(_i64(x) - tin.z, multiplier, tout.z)]


@_xnnpack_kernel("LEAKY_RELU")
def _x_leaky_relu(graph, idx, op, args):
    """XNNPACK ``qs8_vlrelu``: on ``d = z_in - x`` the multipliers ``-round(256 r)`` (x above the
    zero point) and ``-round(256 float32(alpha r))`` (below), ``r = float32(s_in / s_out)``,
    then ``_xnn_fixed8``."""
    tin, tout = _ts(graph, op, 0), _ts(graph, op, 0, out=True)
    ratio = _f32_ratio(tin.s, tout.s)
    positive = int(np.rint(_F32(-256.0) * ratio))
    negative = int(np.rint(_F32(-256.0) * _F32(_F32(op["params"].get("alpha", 0.2)) * ratio)))
    d = tin.z - _i64(args[0])
    return [_xnn_fixed8(d, np.where(d >= 0, negative, positive), tout.z)]


#: ops LiteRT 2.3's XNNPACK delegate runs with the reference kernels' results (measured with one-op
#: models on every input code): LUT activations, data movement, max pooling, DEQUANTIZE
XNNPACK_REFERENCE_EQUAL_OPS = ("CONCATENATION", "DEQUANTIZE", "LOGISTIC", "MAX_POOL_2D", "PAD", "RESHAPE", "TANH")
#: int8 ops LiteRT 2.3's XNNPACK delegate leaves to the builtin kernels (which equal the reference ones)
XNNPACK_UNDELEGATED_OPS = ("AVERAGE_POOL_2D", "HARD_SWISH", "MAXIMUM", "MINIMUM", "RELU", "RELU6", "SOFTMAX")
XNNPACK_ARITHMETIC_OPS = tuple(sorted(_XNNPACK_KERNELS))


SUPPORTED_OPS = tuple(sorted(_KERNELS))
