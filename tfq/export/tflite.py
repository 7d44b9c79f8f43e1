"""Integer grids -> an inference graph of 8-bit-container FakeQuant ops -> TFLite.

``to_tflite(model)`` rebuilds a quantized Keras model (tfq scheme, or any tfmot model whose
quantizers answer ``integer_grid``) as a float inference model in which

* each weighted layer's kernel is its fake-quantized kernel with the following BatchNormalization
  folded in exactly: per output channel ``scale' = scale * |gamma| / sqrt(var + eps)``, the code's
  sign flipped where gamma < 0, ``bias' = (bias - mean) * gamma / sqrt(var + eps) + beta``; the kernel
  passes through a per-channel (Conv2D, DepthwiseConv2D) or per-tensor FakeQuant whose range is
  ``[-127, 127] * scale'`` (zero point 0), so the converter recovers the trained codes exactly;
* each tensor with a ``UniformGrid`` gets an 8-bit FakeQuant with range
  ``[(-128 - z8) s, (127 - z8) s]`` (``z8`` the integer zero point moved into int8; SPEC "Export rules":
  never a symmetric float range), followed by MINIMUM/MAXIMUM at the grid's own code range when it
  is narrower than 8 bits — the converter rejects num_bits < 8 on activations, while an int8 MIN/MAX
  at an unchanged scale is exact;
* a tensor with a table grid (``ThresholdGrid``, activation ``CodebookGrid``: an int8 input code
  -> int8 output code map) becomes an exact staircase: the input at its 8-bit grid, one broadcast
  SUB against the jump positions, clamps to one step (``{0, 1}`` codes), and a fully-connected
  reduction whose int8 weights are the jump heights, at multiplier exactly 1.

Integer zero points: LSQ+ offsets are whole numbers of steps during training (straight-through
rounding, ``integer_offset=True``), so no remainder has to be folded anywhere; ``export_report``
lists, per tensor, the grid and how its offset was made integral.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Dict, List, Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq import costs, graph
from tfq.export.flatbuffer import share_quantization_vectors
from tfq.ptq import fold
from tfq.quantizers.grid import CodebookGrid, PiecewiseGrid, ThresholdGrid, UniformGrid
from tfq.quantizers.pwlq import ShiftedGrid, broadcast_parameter, piecewise_codes

WEIGHTED = ("Conv2D", "DepthwiseConv2D", "Dense")


class ExportError(ValueError):
    """A model (or one of its layers) cannot be exported exactly; the message names the layer."""


# --- weights ---------------------------------------------------------------------------------
def weight_step(grid, layer_name):
    """Per-channel (or scalar) real step between consecutive int8 weight codes of a uniform or
    codebook ``grid`` (piecewise grids go through ``piecewise_parts``)."""
    if isinstance(grid, (UniformGrid, CodebookGrid)):
        if np.any(np.asarray(grid.zero_point) != 0):
            raise ExportError(f"{layer_name}: weight grid has a non-zero zero point; TFLite int8 "
                              "weights are symmetric (zero point 0)")
        return np.asarray(grid.scale, np.float64)
    raise ExportError(f"{layer_name}: a {type(grid).__name__} cannot describe weights")


def _per_channel(step, kernel_shape, axis, n_out):
    """``step`` as a vector over the ``n_out`` output channels (flattened ``axis``)."""
    step = np.asarray(step, np.float64)
    if step.ndim == 0:
        return np.full(n_out, float(step)), False
    flat = step.reshape(-1)
    if flat.size != n_out:
        raise ExportError(f"weight scale has {flat.size} values for {n_out} output channels (axis {axis} of "
                          f"kernel {kernel_shape}): scales that vary along input channels (PWLQ "
                          "granularity='group') have no int8 TFLite form, whose convolutions carry one "
                          "scale per output channel")
    return flat, True


# --- piecewise kernels as integer parts (PWLQ) -----------------------------------------------
@dataclasses.dataclass
class KernelPart:
    """One integer part of a kernel: real values ``scale[c] * codes`` (``codes`` int64 in the layer's
    kernel layout, ``|codes| <= 127``; ``scale`` per output channel, flattened)."""

    codes: np.ndarray
    scale: np.ndarray


#: part j merges into part i (``s_j ~ k s_i``) when that moves no weight by more than this share of
#: its channel's max |w| (float32 grid parameters: p = L s_c holds to ~1e-7)
PART_MERGE_RTOL = 2.5e-7
#: the parts must rebuild the fake-quantized kernel to this share of each channel's max |w|
PART_RECONSTRUCTION_RTOL = 1e-6


def _grid_values(value, axis, shape):
    """A grid parameter given along ``axis`` broadcast to the kernel ``shape``."""
    return np.broadcast_to(broadcast_parameter(np.asarray(value, np.float64), axis, len(shape)), shape)


def _merge_parts(candidates, peak):
    """Merge part ``j`` into part ``i`` in every output channel where ``j`` holds codes, ``s_j = k s_i``
    (whole ``k >= 1``) and ``Q_i + k Q_j`` stays in int8 (into an empty channel of ``i`` only when
    ``i < j``, so equal scales do not merge back and forth); then move a part into another wherever the
    other's channels are empty (each channel keeps its own scale); drop empty parts; split parts whose
    codes exceed 127 (8 bits per piece) into parts of the same scale. ``k`` is whole when the merge
    changes no value by more than ``PART_MERGE_RTOL * peak`` (``peak``: max |w| per channel)."""
    parts = [[np.array(c, np.int64), np.array(sc, np.float64)] for c, sc in candidates]

    def live(j):
        return np.any(parts[j][0] != 0, axis=0)

    for i in range(len(parts)):
        for j in range(len(parts)):
            c_i, s_i = parts[i]
            c_j, s_j = parts[j]
            both = live(j) & (live(i) | (i < j))
            if i == j or not both.any():
                continue
            ratio = s_j / s_i
            k = np.round(ratio)
            merged = c_i + c_j * k.astype(np.int64)
            moved = np.max(np.abs(c_j), axis=0) * np.abs(s_j - k * s_i)
            ok = (both & (k >= 1) & (moved <= PART_MERGE_RTOL * peak)
                  & (np.max(np.abs(merged), axis=0) <= INT8_CODE_LIMIT))
            c_i[:, ok] = merged[:, ok]
            c_j[:, ok] = 0
    for i in range(len(parts)):
        for j in range(i + 1, len(parts)):
            move = live(j) & ~live(i)
            parts[i][0][:, move] = parts[j][0][:, move]
            parts[i][1][move] = parts[j][1][move]
            parts[j][0][:, move] = 0
    kept = [p for p in parts if np.any(p[0] != 0)] or parts[:1]
    out = []
    for codes, scale in kept:
        while np.max(np.abs(codes)) > INT8_CODE_LIMIT:
            head = np.clip(codes, -INT8_CODE_LIMIT, INT8_CODE_LIMIT)
            out.append([head, scale])
            codes = codes - head
        out.append([codes, scale])
    return out


def piecewise_parts(grid, w_q, kind, layer_name):
    """``(parts, groups)``: the PWLQ kernel ``w_q`` (fake-quantized, layer layout) on ``grid`` as
    integer parts whose sum ``sum_j scale_j[c] * codes_j`` is the kernel (pwlq.txt eq. 3, the paper's
    accumulators), and the number of input-channel groups with their own pieces.

    Per group (``granularity="group"``: rows of the kernel with their own parameters; codes zero
    outside the group) the candidate parts are the centre codes ``sign * c`` (scale ``s_c``), the
    breakpoint term ``sign`` (scale ``p``) and the tail codes ``sign * c`` (scale ``s_t``), codes from
    ``tfq.quantizers.pwlq.piecewise_codes``. ``_merge_parts`` then merges parts whose scales are
    whole multiples (``p = (2^b - 1) s_c`` always merges into the centre; with
    ``integer_tail_ratio=True`` everything does: one part, one int8 convolution). A ``ShiftedGrid``
    (PWLQ ``bias_correction="exact"``: ``w = base + shift[c]``) adds a part of codes ``sign(shift)``
    at scale ``|shift|`` (the sum of the inputs over each receptive field) to its base grid's parts
    (piecewise, or uniform: one part per group of equal steps); it merges into a part whose scale
    divides the shift. Raises ``ExportError`` naming the layer if the parts do not rebuild ``w_q`` to
    float32 precision.
    """
    w = np.asarray(w_q, np.float64)
    n_out = _output_channels(kind, w.shape)

    def rows(a):
        return _to_channels_last(kind, np.asarray(a)).reshape(-1, n_out)

    shifted = isinstance(grid, ShiftedGrid)
    base_grid = grid.grid if shifted else grid
    shift = _grid_values(grid.shift, grid.axis, w.shape) if shifted else np.zeros(w.shape)
    base = w - shift
    if isinstance(base_grid, PiecewiseGrid):
        candidates, groups = _piecewise_candidates(base_grid, base, rows)
    else:  # a uniform base (PWLQ method="uniform" with bias_correction="exact"): one part per group
        step = rows(_grid_values(weight_step(base_grid, layer_name), base_grid.axis, w.shape))
        codes = np.round(rows(base) / step).astype(np.int64)
        _, group = np.unique(step, axis=0, return_inverse=True)
        group = np.asarray(group).reshape(-1)
        groups = int(group.max()) + 1
        candidates = [(np.where((group == g)[:, None], codes, 0), step[int(np.argmax(group == g))])
                      for g in range(groups)]
    if shifted:
        # the shift is a part of its own: codes sign(shift) everywhere in the channel, scale |shift|
        # (w = base + shift, so the accumulator needs the sum of the inputs over the receptive field)
        per_channel = rows(shift)[0]
        candidates.append((np.broadcast_to(np.sign(per_channel), rows(w).shape).astype(np.int64),
                           np.where(per_channel == 0, 1.0, np.abs(per_channel))))
    target = rows(w)
    merged = _merge_parts(candidates, np.max(np.abs(target), axis=0))
    rebuilt = sum(codes * scale for codes, scale in merged)
    error = np.abs(rebuilt - target)
    tolerance = PART_RECONSTRUCTION_RTOL * np.max(np.abs(target), axis=0)
    if np.any(error > tolerance):
        worst = float(np.max(error / np.maximum(np.max(np.abs(target), axis=0), 1e-30)))
        raise ExportError(f"{layer_name}: the integer parts of its piecewise kernel do not rebuild the "
                          f"fake-quantized kernel (largest error {worst:.3g} of a channel's max |w|); the "
                          f"kernel is not on its {type(grid).__name__}")
    parts = [KernelPart(codes.reshape(w.shape), scale) for codes, scale in merged]
    return parts, groups


def _piecewise_candidates(grid, w, rows):
    """Per input-channel group the centre, breakpoint and tail parts of ``w`` on ``grid`` (before
    merging) and the number of groups; ``rows`` maps a kernel-shaped array to [rows, n_out]."""
    sign, codes, tail = piecewise_codes(grid, w)
    signed, unit, in_tail = rows(sign.astype(np.int64) * codes), rows(sign.astype(np.int64)), rows(tail)
    params = [rows(_grid_values(getattr(grid, name), grid.axis, w.shape))
              for name in ("centre_scale", "breakpoint", "tail_scale")]
    _, group = np.unique(np.concatenate(params, axis=1), axis=0, return_inverse=True)
    group = np.asarray(group).reshape(-1)
    candidates = []
    for g in range(int(group.max()) + 1):
        member = (group == g)[:, None]
        first = int(np.argmax(group == g))
        s_c, p, s_t = (param[first] for param in params)
        candidates += [(np.where(member & ~in_tail, signed, 0), s_c), (np.where(member & in_tail, unit, 0), p),
                       (np.where(member & in_tail, signed, 0), s_t)]
    return candidates, int(group.max()) + 1


def _split_message(layer_name, n_parts, groups):
    why = []
    if groups > 1:
        why.append(f"{groups} input-channel groups with their own scales (granularity='group'); an int8 "
                   "TFLite convolution has one scale per output channel")
    why.append("tail scale not a whole multiple of the centre scale, or codes beyond int8" if groups == 1 else
               "each group's pieces")
    return (f"{layer_name}: its PWLQ kernel is a sum of {n_parts} integer parts ({'; '.join(why)}). TFLite "
            "would requantize each part's convolution to int8 before the sum (two roundings), so no TFLite "
            "graph holds it exactly. Ways out: quantize with tfq.ptq.pwlq(..., integer_tail_ratio=True, "
            "granularity='channel') for one int8 convolution; tfq.export.to_integer_graph(model) for an exact "
            "integer graph (int32 accumulators of the parts, one rounding); or to_tflite(..., "
            "approximate_piecewise=True) to re-quantize the kernel to plain per-channel int8 (not exact)")


@dataclasses.dataclass
class FoldedWeights:
    """Integer kernel codes (int8 values, layer's kernel layout) and their float factors."""

    codes: np.ndarray
    step: np.ndarray          # per output channel (flattened)
    per_channel: bool
    bias: np.ndarray          # float, per output channel
    bits: int
    kind: str
    note: str = ""            # e.g. the approximation of a split piecewise kernel


def _output_channels(kind, kernel_shape):
    if kind == "DepthwiseConv2D":
        return kernel_shape[2] * kernel_shape[3]
    return kernel_shape[-1]


def _to_channels_last(kind, array):
    """Kernel -> [..., n_out] view whose last axis is the output channel."""
    if kind == "DepthwiseConv2D":
        h, w, c, m = array.shape
        return array.reshape(h, w, 1, c * m)
    return array


def _quantized_kernel(wrapper):
    """``(inner layer, kind, grid, fake-quantized kernel as float64)`` of a weighted wrapper."""
    inner = costs.inner_layer(wrapper)
    kind = type(inner).__name__
    pairs = costs.weight_quantizers(wrapper)
    if not pairs:
        raise ExportError(f"{wrapper.name}: {kind} has no weight quantizer; every weighted layer must be "
                          "quantized to export an integer model")
    kernel_var, quantizer, qvars = pairs[0]
    grid = quantizer.integer_grid(qvars)
    w_q = np.asarray(quantizer(kernel_var, training=False, weights=qvars), np.float64)
    return inner, kind, grid, w_q


def _layer_bias(inner, n_out):
    return (np.asarray(inner.bias.numpy(), np.float64) if getattr(inner, "use_bias", False) and inner.bias is not None
            else np.zeros(n_out))


def _approximate_piecewise(grid, w_q, kind, n_parts):
    """Plain per-channel int8 codes of a split piecewise kernel (step ``max|w|/127`` per output
    channel), the step, and a report note with the largest weight change in centre steps."""
    w_last = _to_channels_last(kind, w_q)
    n_out = w_last.shape[-1]
    peak = np.max(np.abs(w_last.reshape(-1, n_out)), axis=0)
    step = np.where(peak > 0, peak / INT8_CODE_LIMIT, 1.0)
    codes = np.round(w_last / step)
    base = grid.grid if isinstance(grid, ShiftedGrid) else grid
    unit = base.centre_scale if isinstance(base, PiecewiseGrid) else base.scale
    centre = _to_channels_last(kind, _grid_values(unit, base.axis, w_q.shape))
    change = float(np.max(np.abs(codes * step - w_last) / centre))
    note = (f", APPROXIMATE: piecewise kernel ({n_parts} integer parts) re-quantized to plain per-channel "
            f"int8 (approximate_piecewise=True), largest weight change {change:.3g} centre steps; "
            "to_integer_graph is exact")
    return codes, step, note


def _fold_batch_norm(batch_norm, bias, kernels):
    """Fold ``batch_norm`` (the BatchNormalization after a weighted layer) into its float ``bias``
    and ``kernels``, a list of ``(codes, step)``: codes with the output channel last, step per output
    channel. Codes are negated where the BatchNorm factor is negative and steps multiplied by its
    magnitude (1e-12 where that is 0). Returns ``(bias, [(codes, step), ...])``."""
    factor, shift = fold.batch_norm_factors(costs.inner_layer(batch_norm))
    sign = np.sign(np.where(factor == 0, 1.0, factor))
    folded = []
    for codes, step in kernels:
        step = np.asarray(step, np.float64) * np.abs(factor)
        folded.append((codes * sign, np.where(step == 0, 1e-12, step)))
    return bias * factor + shift, folded


def _needs_parts(grid, n_out):
    """Whether a weight grid goes through ``piecewise_parts``: piecewise and shifted grids, and
    uniform grids whose scales vary along input channels (PWLQ ``method="uniform",
    granularity="group"``), which no single per-output-channel int8 kernel holds."""
    if isinstance(grid, (PiecewiseGrid, ShiftedGrid)):
        return True
    return isinstance(grid, UniformGrid) and np.asarray(grid.scale).size not in (1, n_out)


def fold_weights(wrapper, batch_norm=None, approximate_piecewise=False) -> FoldedWeights:
    """Codes of ``wrapper``'s fake-quantized kernel with ``batch_norm`` (a BN layer or None) folded.

    A piecewise (PWLQ) kernel that is one int8 grid (``piecewise_parts`` merges into one part) keeps
    its codes; one that needs several parts raises ``ExportError`` (``_split_message``), or with
    ``approximate_piecewise=True`` is re-quantized to plain per-channel int8 (``note`` says so)."""
    name = wrapper.name
    inner, kind, grid, w_q = _quantized_kernel(wrapper)
    n_out = _output_channels(kind, w_q.shape)
    note = ""
    if _needs_parts(grid, n_out):
        parts, groups = piecewise_parts(grid, w_q, kind, name)
        if len(parts) == 1:
            codes, step = _to_channels_last(kind, parts[0].codes).astype(np.float64), parts[0].scale
            per_channel = grid.axis is not None
        elif approximate_piecewise:
            codes, step, note = _approximate_piecewise(grid, w_q, kind, len(parts))
            per_channel = True
        else:
            raise ExportError(_split_message(name, len(parts), groups))
    else:
        step, per_channel = _per_channel(weight_step(grid, name), w_q.shape, getattr(grid, "axis", None), n_out)
        w_last = _to_channels_last(kind, w_q)
        codes = np.round(w_last / step)
        if not np.allclose(codes * step, w_last, rtol=1e-4, atol=1e-6 * float(np.max(step))):
            raise ExportError(f"{name}: fake-quantized kernel is not on its declared grid (max error "
                              f"{np.max(np.abs(codes * step - w_last)) / np.max(step):.3g} steps)")
    bias = _layer_bias(inner, n_out)
    if batch_norm is not None:
        bias, [(codes, step)] = _fold_batch_norm(batch_norm, bias, [(codes, step)])
        per_channel = True
    if np.max(np.abs(codes)) > 127:
        raise ExportError(f"{name}: weight code {int(np.max(np.abs(codes)))} does not fit TFLite's "
                          "symmetric int8 weights [-127, 127] (8-bit weights need narrow_range=True)")
    codes = codes.reshape(w_q.shape)
    return FoldedWeights(codes.astype(np.int64), step, per_channel, bias, int(getattr(grid, "bits", 8)), kind,
                         note)


@dataclasses.dataclass
class SplitWeights:
    """A weighted layer whose (BatchNorm-folded) kernel is a sum of integer parts."""

    parts: List[KernelPart]   # scales per output channel, BatchNorm folded
    bias: np.ndarray          # float, per output channel, BatchNorm folded
    kind: str
    groups: int


def split_weights(wrapper, batch_norm=None) -> Optional[SplitWeights]:
    """The integer parts of ``wrapper``'s piecewise kernel with ``batch_norm`` folded (per channel:
    codes negated where gamma < 0, scales times ``|factor|``), or None when the layer is one int8
    convolution (not piecewise, or its parts merge into one)."""
    inner, kind, grid, w_q = _quantized_kernel(wrapper)
    if not _needs_parts(grid, _output_channels(kind, w_q.shape)):
        return None
    parts, groups = piecewise_parts(grid, w_q, kind, wrapper.name)
    if len(parts) == 1:
        return None
    bias = _layer_bias(inner, _output_channels(kind, w_q.shape))
    if batch_norm is not None:
        bias, folded = _fold_batch_norm(batch_norm, bias, [(_to_channels_last(kind, p.codes), p.scale)
                                                           for p in parts])
        parts = [KernelPart(codes.reshape(p.codes.shape).astype(np.int64), scale)
                 for p, (codes, scale) in zip(parts, folded)]
    return SplitWeights(parts, bias, kind, groups)


INT8_CODE_LIMIT = 127  # TFLite's symmetric int8 weights
INT4_CODE_LIMIT = 7    # symmetric INT4 storage


def code_multipliers(folded, limit=INT8_CODE_LIMIT, base=1.0):
    """Per output channel (one value for a per-tensor step): the largest multiple ``k`` of ``base``
    with ``k * max|code| <= limit`` (at least ``base``)."""
    codes = _to_channels_last(folded.kind, np.abs(folded.codes.astype(np.float64)))
    peak = np.max(codes.reshape(-1, codes.shape[-1]), axis=0)
    if not folded.per_channel:
        peak = np.full(peak.shape, np.max(peak))
    base = np.broadcast_to(np.asarray(base, np.float64), peak.shape)
    return base * np.maximum(np.floor(limit / (np.maximum(peak, 1.0) * base)), 1.0)


def refine_codes(folded, k):
    """Multiply each output channel's codes by ``k`` (from ``code_multipliers``) and divide its
    step by ``k``, in place.

    The kernel's real values do not change, but the integer model rounds the bias to the accumulator
    step ``s_in * s_w / k``, k times finer: a 2-bit kernel (codes -1..1) fills the int8 range with
    codes -126..126 and its bias error shrinks 126-fold. Otherwise low-bit kernels use a small part
    of the int8 container, and their coarse bias grid moves outputs by whole steps (``snap_biases``).
    """
    codes = _to_channels_last(folded.kind, folded.codes.astype(np.float64))
    folded.codes = (codes * k).reshape(folded.codes.shape).astype(np.int64)
    folded.step = np.asarray(folded.step, np.float64) / k


def export_weights(layer, batch_norm, s_in, int4_weights=False, approximate_piecewise=False):
    """``(folded, int4, note)``: the layer's BatchNorm-folded codes as the integer model stores them
    (``refine_codes`` into the INT4 or int8 range, int32-safe bias for input step ``s_in``), whether
    they are stored as INT4, and a report note. ``snap_biases`` and the export both use this, so
    they agree. ``approximate_piecewise``: see ``fold_weights``."""
    folded = fold_weights(layer, batch_norm, approximate_piecewise)
    note = folded.note
    int4 = int4_weights and folded.bits <= 4
    if int4 and np.max(np.abs(folded.codes)) > INT4_CODE_LIMIT:
        # code -8 negated by a negative BatchNorm gamma: INT4 storage is symmetric [-7, 7]
        int4 = False
        note += (f", INT8 storage: codes reach {int(np.max(np.abs(folded.codes)))} after folding "
                 "(beyond INT4's [-7, 7]; quantize with narrow_range_weights=True for INT4)")
    elif int4:
        note += ", INT4 storage"
    if folded.bits <= 4 and np.max(np.abs(folded.codes)) <= INT4_CODE_LIMIT:
        # INT4's multiplier divides the int8 one: a bias on the INT4 grid is on the int8 grid too, so
        # a model snapped for INT4 exports identically with either storage
        k = code_multipliers(folded, INT4_CODE_LIMIT)
        if not int4:
            k = code_multipliers(folded, INT8_CODE_LIMIT, base=k)
    else:
        k = code_multipliers(folded, INT8_CODE_LIMIT)
    refine_codes(folded, k)
    if np.max(k) > 1:
        note += f", codes x{int(np.min(k))}..{int(np.max(k))} (finer int32 bias grid)"
    note += _keep_bias_in_int32(folded, s_in)
    return folded, int4, note


def tensor_step(grid):
    """Real value of one int8 code step of an activation tensor with ``grid`` (its output grid
    for table grids), as the consuming integer kernel sees it."""
    if isinstance(grid, ThresholdGrid):
        return float(grid.out_scale)
    return float(np.max(np.asarray(grid.scale)))


def input_step(view, name):
    """``tensor_step`` of the grid holding layer ``name``'s input, or None for a float input."""
    quantizer, qvars = costs.input_quantizer(view, name)
    if quantizer is None:
        return None
    return tensor_step(quantizer.integer_grid(qvars))


INT32_BIAS_LIMIT = 2 ** 30  # TFLite stores round(bias / (s_in * s_w)) in int32; keep a 2x margin


def _keep_bias_in_int32(folded, s_in):
    """Raise the weight step of channels whose int32 bias would overflow (a learned scale that
    collapsed to ~0: the channel's kernel is ~0 and its output is its bias); ``s_in``: the input's
    step (None for a float input). Returns a report note."""
    if s_in is None:
        return ""
    needed = np.abs(folded.bias) / (s_in * INT32_BIAS_LIMIT)
    bad = np.nonzero(folded.step < needed)[0]
    if bad.size == 0:
        return ""
    codes = _to_channels_last(folded.kind, folded.codes.astype(np.float64))
    for c in bad:
        new_step = needed[c] * 1.01
        codes[..., c] = np.round(codes[..., c] * folded.step[c] / new_step)
        folded.step[c] = new_step
    folded.codes = codes.reshape(folded.codes.shape).astype(np.int64)
    folded.per_channel = True
    return (f", weight step of channel(s) {bad.tolist()} raised to keep the int32 bias in range "
            "(their learned scale had collapsed; kernels ~0)")


# --- activations -----------------------------------------------------------------------------
def activation_plan(grid, tensor_name):
    """JSON-able description of how a tensor's grid is emitted (what ``ExportQuantize`` runs)."""
    if isinstance(grid, UniformGrid):
        if grid.axis is not None:
            raise ExportError(f"{tensor_name}: per-channel activation grids are not supported by TFLite")
        scale, z8, cmin, cmax = grid.to_int8_container()
        return {"kind": "uniform", "scale": float(scale), "zero_point": int(z8), "code_min": int(cmin),
                "code_max": int(cmax)}
    if isinstance(grid, (ThresholdGrid, CodebookGrid)):
        if grid.input_grid is None:
            raise ExportError(f"{tensor_name}: a {type(grid).__name__} activation needs its input_grid")
        table = np.asarray(grid.code_table(), np.int64)
        in_plan = activation_plan(grid.input_grid, tensor_name)
        if isinstance(grid, ThresholdGrid):
            out_scale, out_zp = float(grid.out_scale), int(grid.out_zero_point)
            out_codes = table
            if out_codes.max() - out_zp > 127 or out_codes.min() - out_zp < -128:
                # unsigned output codes move into int8 like UniformGrid.to_int8_container
                shift = 128
                out_codes, out_zp = out_codes - shift, out_zp - shift
        else:
            out_scale, out_zp, out_codes = float(np.asarray(grid.scale).reshape(())), int(grid.zero_point), table
        return {"kind": "table", "input": in_plan, "table": out_codes.tolist(), "scale": out_scale,
                "zero_point": out_zp}
    raise ExportError(f"{tensor_name}: no TFLite form for a {type(grid).__name__} activation")


def _fake_quant_uniform(x, plan):
    s, z = plan["scale"], plan["zero_point"]
    x = tf.quantization.fake_quant_with_min_max_vars(x, (-128 - z) * s, (127 - z) * s, num_bits=8)
    if plan["code_max"] == 127 and plan["code_min"] == -128:
        return x
    if plan["code_max"] < 127:
        x = tf.minimum(x, (plan["code_max"] - z) * s)
    if plan["code_min"] > -128 and not (plan.get("nonnegative_input") and plan["code_min"] <= z):
        x = tf.maximum(x, (plan["code_min"] - z) * s)
    # the same range again: the converter then keeps the clamps in int8 at this scale (it turns
    # max(x, 0) into RELU, which would otherwise have no quantization statistics)
    return tf.quantization.fake_quant_with_min_max_vars(x, (-128 - z) * s, (127 - z) * s, num_bits=8)


def _staircase(x, plan):
    """Exact int8 form of a code table: out = c0 + sum_k h_k [in_code >= t_k] (see module doc)."""
    inp = plan["input"]
    x = _fake_quant_uniform(x, inp)
    s_in, z_in = inp["scale"], inp["zero_point"]
    table = np.asarray(plan["table"], np.int64)
    jumps = np.nonzero(np.diff(table))[0] + 1          # int8 code index where the output changes
    c0 = int(table[0])
    s_out, z_out = plan["scale"], plan["zero_point"]
    base = (c0 - z_out) * s_out
    if jumps.size == 0:
        return tf.zeros_like(x) + base
    heights = table[jumps] - table[jumps - 1]
    if np.any(np.abs(heights) > 127):
        raise ExportError("table activation: an output jump exceeds 127 codes")
    # input codes are -128 + index; [code >= t] == clamp(x - (t - 1 - z) s, 0, s) / s
    t = (jumps - 128).astype(np.float64)
    offsets = ((t - 1 - z_in) * s_in).astype(np.float32)
    d = tf.expand_dims(x, -1) - offsets
    d = tf.quantization.fake_quant_with_min_max_vars(d, -128 * s_in, 127 * s_in, num_bits=8)
    d = tf.minimum(tf.nn.relu(d), s_in)
    steps = tf.quantization.fake_quant_with_min_max_vars(d, -128 * s_in, 127 * s_in, num_bits=8)
    # weights h_k * (s_out / s_in): int8 codes h_k at weight scale s_out/s_in, multiplier 1
    w_scale = s_out / s_in
    kernel = tf.quantization.fake_quant_with_min_max_vars(
        tf.constant((heights * w_scale).astype(np.float32)[:, None]), -127 * w_scale, 127 * w_scale,
        num_bits=8, narrow_range=True)
    y = tf.squeeze(tf.tensordot(steps, kernel, axes=[[-1], [0]]), -1) + base
    lo, hi = (-128 - z_out) * s_out, (127 - z_out) * s_out
    return tf.quantization.fake_quant_with_min_max_vars(y, lo, hi, num_bits=8)


def emit(x, plan):
    if plan is None:
        return x
    if plan["kind"] == "uniform":
        return _fake_quant_uniform(x, plan)
    return _staircase(x, plan)


# --- export layers ---------------------------------------------------------------------------
class ExportWeighted(keras.layers.Layer):
    """Conv2D / DepthwiseConv2D / Dense with a FakeQuant'd folded kernel and an output grid."""

    def __init__(self, name, kind, layer_config, folded: FoldedWeights, output_plan=None, int4=False, **kwargs):
        super().__init__(name=name, **kwargs)
        self.kind, self.cfg, self.output_plan, self.int4 = kind, layer_config, output_plan, int4
        self.codes, self.step, self.per_channel = folded.codes, folded.step, folded.per_channel
        self.bias_values = folded.bias.astype(np.float32)

    def build(self, input_shape):
        real = (_to_channels_last(self.kind, self.codes.astype(np.float64)) * self.step).astype(np.float32)
        if self.kind == "Dense" and self.per_channel:
            real = real.reshape((1, 1) + real.shape)  # the 1x1 convolution's HWIO kernel, quantized as such
        # a variable rather than a constant made in call: the converter copies a call's constants into
        # every function it traces, but freezes variables once (ResNet50: a 4x lower export peak)
        self.real_kernel = self.add_weight("real_kernel", shape=real.shape, dtype=tf.float32, trainable=False,
                                           initializer=keras.initializers.Constant(real))
        super().build(input_shape)

    def _kernel(self):
        real = self.real_kernel
        levels = 7 if self.int4 else 127
        bits = 4 if self.int4 else 8
        if self.per_channel:
            lo, hi = (-levels * self.step).astype(np.float32), (levels * self.step).astype(np.float32)
            k = tf.quantization.fake_quant_with_min_max_vars_per_channel(real, lo, hi, num_bits=bits,
                                                                         narrow_range=True)
        else:
            s = float(self.step[0])
            k = tf.quantization.fake_quant_with_min_max_vars(real, -levels * s, levels * s,
                                                             num_bits=bits, narrow_range=True)
        return k if self.kind == "Dense" and self.per_channel else tf.reshape(k, self.codes.shape)

    def call(self, x):
        k = self._kernel()
        c = self.cfg
        if self.kind == "Conv2D":
            y = tf.nn.conv2d(x, k, strides=c["strides"], padding=c["padding"].upper(), dilations=c["dilation_rate"])
        elif self.kind == "DepthwiseConv2D":
            y = tf.nn.depthwise_conv2d(x, k, strides=(1,) + tuple(c["strides"]) + (1,), padding=c["padding"].upper(),
                                       dilations=c["dilation_rate"])
        elif self.per_channel:
            # per-channel Dense as a 1x1 convolution: TFLite's FULLY_CONNECTED would need the kernel
            # transposed, which the converter refuses for per-channel quantized weights
            n_in, n_out = self.codes.shape
            shape = tf.shape(x)
            y = tf.nn.conv2d(tf.reshape(x, [-1, 1, 1, n_in]), k, 1, "VALID")
            y = tf.reshape(y, tf.concat([shape[:-1], [n_out]], 0))
        else:
            y = tf.tensordot(x, k, axes=[[-1], [0]]) if x.shape.rank > 2 else tf.matmul(x, k)
        y = y + self.bias_values
        return emit(y, self.output_plan)


class ExportWrapped(keras.layers.Layer):
    """A float layer (activation, Add, pooling, ...) followed by its output grid."""

    def __init__(self, name, inner, output_plan, **kwargs):
        super().__init__(name=name, **kwargs)
        self.inner, self.output_plan = inner, output_plan

    def call(self, *args, **kwargs):
        plan = self.output_plan
        if plan is not None and plan["kind"] == "table" and plan.get("of_input"):
            return emit(args[0], plan)  # the table is the whole layer: input code -> output code
        if plan is not None and plan["kind"] == "uniform" and _is_relu(self.inner):
            plan = dict(plan, nonnegative_input=True)  # the lower clamp at real 0 is the ReLU itself
        return emit(self.inner(*args, **kwargs), plan)


def _is_relu(layer):
    kind = type(layer).__name__
    if kind == "ReLU":
        cfg = layer.get_config()
        return not cfg.get("negative_slope") and not cfg.get("threshold")
    if kind == "Activation":
        return graph.activation_name(layer) in ("relu", "relu6")
    return False


class ExportQuantize(keras.layers.Layer):
    """A tensor's grid on its own: a tfmot QuantizeLayer, or a BatchNormalization folded into the
    preceding layer (identity, plus the BatchNorm's output grid if it had one)."""

    def __init__(self, name, plan, **kwargs):
        super().__init__(name=name, **kwargs)
        self.plan = plan

    def call(self, x):
        return emit(x, self.plan)


# --- model rebuild ---------------------------------------------------------------------------
def _output_plan(layer):
    quantizer, qvars = costs.output_quantizer(layer)
    if quantizer is None:
        return None, None
    grid = quantizer.integer_grid(qvars)
    return activation_plan(grid, layer.name), grid


def _quantized_weighted_layers(view):
    """``(name, wrapper, BatchNorm or None)`` for every tfmot-wrapped Conv2D / DepthwiseConv2D /
    Dense of ``view``, with the BatchNormalization export folds into it (``_foldable_bn``)."""
    for name, layer in view.layers.items():
        inner = costs.inner_layer(layer)
        if type(inner).__name__ in WEIGHTED and layer is not inner:
            yield name, layer, _foldable_bn(view, name)


def _foldable_bn(view, name):
    """The BatchNormalization consuming weighted layer ``name`` alone, or None."""
    consumers = view.consumers[name]
    if len(consumers) != 1 or name in view.outputs:
        return None
    bn = view.layers[consumers[0]]
    return bn if type(costs.inner_layer(bn)).__name__ == "BatchNormalization" else None


@dataclasses.dataclass
class ExportEntry:
    layer: str
    kind: str
    grid: str
    bits: Optional[int]
    note: str


def hard_swish_table_plan(view, name, output_grid):
    """Plan of an exact int8 table replacing a hard-swish layer: each input code's output code
    exactly as the Keras layer (hard swish, then its output quantizer) computes it.

    TFLite's int8 HARD_SWISH kernel (fixed point, 16-bit intermediates) differs from
    ``round(hard_swish(x) / s_out)`` by one code on ~0.5% of inputs; coarse grids after it amplify
    that (docs/export.md, parity). The staircase (``_staircase``) computes the table exactly.
    """
    layer = view.layers[name]
    grids = _uniform_io_grids(view, name, output_grid)
    if grids is None:
        return None
    in_grid, _ = grids
    s_in, z_in, _, _ = in_grid.to_int8_container()
    s_out, z_out, c_min, c_max = output_grid.to_int8_container()
    x = ((np.arange(-128, 128) - z_in) * float(s_in)).astype(np.float32)
    y = np.asarray(layer(tf.constant(x), training=False), np.float64)  # the Keras forward itself
    table = np.clip(np.round(y / float(s_out)) + z_out, c_min, c_max).astype(np.int64)
    return {"kind": "table", "of_input": True, "input": activation_plan(in_grid, name),
            "table": table.tolist(), "scale": float(s_out), "zero_point": int(z_out)}


def _is_hard_swish(layer):
    return type(layer).__name__ == "Activation" and (
        isinstance(layer.activation, TFLiteHardSwish)
        or graph.activation_name(layer).split(">")[-1] == "hard_swish")


def tflite_hard_swish_codes(input_scale, input_zero_point, output_scale, output_zero_point):
    """TFLite's int8 HARD_SWISH output code for each input code -128..127 (its fixed-point
    reference kernel, the one every LiteRT runtime runs: XNNPACK does not take the op)."""
    from tfq.export.integer import IntegerGraph, TensorSpec
    spec = lambda name, s, z: TensorSpec(name, [1, 256], "int8", [s], [z])  # noqa: E731
    one_op = IntegerGraph([{"op": "HARD_SWISH", "inputs": [0], "outputs": [1]}],
                          {0: spec("input", input_scale, input_zero_point),
                           1: spec("output", output_scale, output_zero_point)}, inputs=[0], outputs=[1])
    return one_op.run(np.arange(-128, 128, dtype=np.int8)[None])[0].astype(np.int64)


@keras.utils.register_keras_serializable(package="tfq")
class TFLiteHardSwish:
    """Hard swish ``x * relu6(x + 3) / 6`` whose forward is what TFLite's int8 HARD_SWISH kernel
    returns for inputs on one int8 grid (``tflite_hard_swish_codes``; it differs from rounding the
    exact value on a few of the 256 codes); the gradient is hard swish's own (straight through).
    ``snap_hard_swish`` installs it; export turns it back into TFLite's HARD_SWISH op."""

    def __init__(self, input_scale, input_zero_point, output_scale, output_zero_point):
        self.input_scale, self.input_zero_point = float(input_scale), int(input_zero_point)
        self.output_scale, self.output_zero_point = float(output_scale), int(output_zero_point)
        codes = tflite_hard_swish_codes(self.input_scale, self.input_zero_point, self.output_scale,
                                        self.output_zero_point)
        self.values = ((codes - self.output_zero_point) * self.output_scale).astype(np.float32)
        self.__name__ = "tflite_hard_swish"

    def __call__(self, x):
        exact = x * tf.nn.relu6(x + 3.0) / 6.0
        code = tf.clip_by_value(tf.round(x / self.input_scale) + self.input_zero_point, -128.0, 127.0)
        table = tf.gather(tf.constant(self.values, x.dtype), tf.cast(code, tf.int32) + 128)
        return exact + tf.stop_gradient(table - exact)

    def grids(self):
        return (self.input_scale, self.input_zero_point, self.output_scale, self.output_zero_point)

    def get_config(self):
        return {"input_scale": self.input_scale, "input_zero_point": self.input_zero_point,
                "output_scale": self.output_scale, "output_zero_point": self.output_zero_point}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def _uniform_io_grids(view, name, output_grid):
    """(input grid, ``output_grid``) of layer ``name`` when both are ``UniformGrid``s, else None."""
    in_quantizer, in_vars = costs.input_quantizer(view, name)
    in_grid = in_quantizer.integer_grid(in_vars) if in_quantizer is not None else None
    if not isinstance(in_grid, UniformGrid) or not isinstance(output_grid, UniformGrid):
        return None
    return in_grid, output_grid


def _hard_swish_grids(view, name):
    """(s_in, z_in, s_out, z_out) of a hard-swish layer's int8 input and output tensors, or None."""
    grids = _uniform_io_grids(view, name, _output_plan(view.layers[name])[1])
    if grids is None:
        return None
    in_grid, out_grid = grids
    s_in, z_in, _, _ = in_grid.to_int8_container()
    s_out, z_out, _, _ = out_grid.to_int8_container()
    return float(s_in), int(z_in), float(s_out), int(z_out)


def snap_hard_swish(model):
    """Make every hard-swish layer compute what TFLite's int8 HARD_SWISH kernel computes, in place.

    TFLite's kernel (fixed point, 16-bit intermediates) misses ``round(hard_swish(x) / s_out)`` by
    one code on a few of the 256 input codes; later layers amplify those flips (docs/export.md,
    parity). This sets each hard-swish ``Activation`` (between uniform int8 grids) to
    ``TFLiteHardSwish`` for its current grids, so Keras equals the exported model's fast HARD_SWISH
    op instead of needing ``to_tflite(exact_hard_swish=True)``'s slower tables. Call it after
    training, like ``snap_biases`` (``tfq train`` does): export raises if the grids have moved since.
    Returns one row per hard-swish layer: its grids and how many input codes TFLite maps elsewhere.
    """
    view = graph.GraphView(model)
    rows = []
    for name, layer in view.layers.items():
        inner = costs.inner_layer(layer)
        if layer is inner or not _is_hard_swish(inner):
            continue
        grids = _hard_swish_grids(view, name)
        if grids is None:
            rows.append({"layer": name, "changed": False, "note": "input or output is not a uniform int8 grid"})
            continue
        snapped = TFLiteHardSwish(*grids)
        x = (np.arange(-128, 128) - grids[1]) * grids[0]
        exact = np.clip(np.round(x * np.clip(x + 3, 0, 6) / 6 / grids[2]) + grids[3], -128, 127)
        moved = int(np.sum(exact != np.round(snapped.values / grids[2]) + grids[3]))
        inner.activation = snapped
        rows.append({"layer": name, "changed": True, "grids": list(grids), "codes_moved": moved})
    if any(r["changed"] for r in rows):
        for attr in ("predict_function", "train_function", "test_function"):
            setattr(model, attr, None)  # traced functions hold the old activation
    return rows


def _checked_hard_swish(view, name, inner):
    """Export form of a hard-swish layer: a ``TFLiteHardSwish`` becomes plain hard swish again
    (which the converter emits as HARD_SWISH) after checking its grids are still the layer's."""
    if not isinstance(inner.activation, TFLiteHardSwish):
        return inner
    grids = _hard_swish_grids(view, name)
    if grids is None or not np.allclose(grids, inner.activation.grids(), rtol=1e-6, atol=0):
        raise ExportError(f"{name}: snap_hard_swish was computed for grids {inner.activation.grids()} "
                          f"(s_in, z_in, s_out, z_out) but the layer's grids are now {grids}; call "
                          "tfq.export.snap_hard_swish(model) again after training")
    from tfq.models import hard_swish
    config = inner.get_config()
    config["activation"] = keras.activations.serialize(hard_swish)
    return inner.__class__.from_config(config)


def build_inference_model(model, int4_weights=False, exact_hard_swish=False, approximate_piecewise=False):
    """(float Keras model with FakeQuant ops, report rows). See the module docstring.
    ``exact_hard_swish``: hard-swish layers become exact int8 tables (``hard_swish_table_plan``)
    instead of TFLite's HARD_SWISH op. ``approximate_piecewise``: PWLQ kernels that need several
    integer parts are re-quantized to plain per-channel int8 (``fold_weights``) instead of raising."""
    view = graph.GraphView(model)
    folded_bn, report, replacements = {}, [], {}
    for name, layer in view.layers.items():
        inner = costs.inner_layer(layer)
        kind = type(inner).__name__
        if kind in WEIGHTED and layer is not inner:
            bn = _foldable_bn(view, name)
            plan, grid = _output_plan(layer)
            if bn is not None:
                if plan is not None:
                    raise ExportError(f"{name}: output quantized before its BatchNormalization {bn.name}")
                folded_bn[bn.name] = name
            folded, int4, weights_note = export_weights(layer, bn, input_step(view, name), int4_weights,
                                                        approximate_piecewise)
            note = ("BatchNorm " + bn.name + " folded" if bn is not None else "no BatchNorm") + weights_note
            replacements[name] = ExportWeighted(name, kind, inner.get_config(), folded, plan, int4=int4)
            report.append(ExportEntry(name, kind, "weights", folded.bits, note))
            if plan is not None:
                report.append(_activation_entry(name, grid, layer))
        elif kind in WEIGHTED:
            raise ExportError(f"{name}: {kind} is not quantized; tfq.export needs every weighted layer "
                              "quantized (use tfq.quantize_model on the whole model)")
    bits = sorted({e.bits for e in report if e.grid == "weights"})
    if int4_weights and not any(b <= 4 for b in bits):
        raise ExportError(f"int4_weights=True but no weight grid has <= 4 bits (weight bits in "
                          f"{model.name!r}: {bits}); INT4 storage needs weights quantized to 2..4 bits")
    for name, layer in view.layers.items():
        if name in replacements:
            continue
        kind = type(layer).__name__
        plan, grid = _output_plan(layer)
        if plan is not None:
            report.append(_activation_entry(name, grid, layer))
        if name in folded_bn or kind == "QuantizeLayer":
            replacements[name] = ExportQuantize(name, plan)
        elif kind.startswith("QuantizeWrapper"):
            inner = costs.inner_layer(layer)
            if exact_hard_swish and plan is not None and _is_hard_swish(inner):
                table_plan = hard_swish_table_plan(view, name, grid)
                if table_plan is not None:
                    plan = table_plan
                    report[-1].note += ("; exported as an exact int8 table of the input code (TFLite's "
                                        "HARD_SWISH kernel rounds differently)")
            export_inner = (_checked_hard_swish(view, name, inner) if _is_hard_swish(inner)
                            else inner.__class__.from_config(inner.get_config()))
            replacements[name] = ExportWrapped(name, export_inner, plan)
        elif type(layer).__name__ == "BatchNormalization":
            raise ExportError(f"{name}: BatchNormalization that does not follow a Conv/Dense cannot be "
                              "folded; an integer model has no float BatchNorm")
    _copy_inner_weights = []

    def clone(layer):
        if layer.name in replacements:
            new = replacements[layer.name]
            if isinstance(new, ExportWrapped):
                _copy_inner_weights.append((new.inner, layer.layer))
            return new
        copy = layer.__class__.from_config(layer.get_config())
        _copy_inner_weights.append((copy, layer))
        return copy

    # batch 1 with static shapes: Reshape layers then export as one RESHAPE, not SHAPE/PACK ops
    inputs = [keras.Input(batch_size=1, shape=t.shape[1:], dtype=t.dtype, name=t.name.split(":")[0])
              for t in model.inputs]
    export_model = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone)
    for new, old in _copy_inner_weights:
        if old.weights:
            new.set_weights(old.get_weights())
    return export_model, report


def _activation_entry(name, grid, layer):
    quantizer, _ = costs.output_quantizer(layer)
    note = ""
    if isinstance(grid, UniformGrid):
        learned = getattr(quantizer, "learn_offset", False)
        if learned:
            note = ("offset learned as a whole number of steps (straight-through rounding): zero point "
                    f"{int(grid.zero_point)}, nothing folded")
        else:
            note = f"symmetric (zero point {int(grid.zero_point)})"
    else:
        note = "int8 input code -> output code table (exact staircase)"
    return ExportEntry(name, "activation", type(grid).__name__, getattr(grid, "bits", None), note)


#: a bias within this many accumulator steps of the int32 grid counts as on it: float32 storage
#: leaves ~1e-7 relative residue, and refined codes make the grid up to 126x finer than the weights'
ON_GRID_TOLERANCE = 1e-2


def snap_biases(model, int4_weights=False):
    """Move every weighted layer's (BatchNorm-folded) bias onto its int32 accumulator grid, in place.

    The integer model adds ``round(bias' / (s_in * s_w'))`` to the int32 accumulator, i.e. a bias
    rounded to a step of ``s_in * s_w'`` (per output channel, after BatchNorm folding). With coarse
    inputs and weights that step can exceed the output's own step several times over (a 4-bit input
    times 4-bit weights feeding an 8-bit BatchNorm output), so Keras and the integer model would
    differ by whole output steps. This adds the rounding difference to the BatchNorm's beta (or the
    layer's bias) so that the Keras model computes what the integer model computes. Call it once,
    after training and before evaluating or exporting (``tfq.train.run`` does). The grid is the one
    the export uses (``export_weights``: codes refined to fill the int8 range, or the INT4 range with
    ``int4_weights=True``; an int8 grid is finer than the INT4 one, so snap with the storage you will
    export). Returns one row per layer: the largest change in accumulator steps (<= 0.5) and in
    output steps. Split piecewise (PWLQ) layers are skipped with a note: ``to_integer_graph`` stores
    their bias at ``s_out * 2^-16`` (``IntegerGraph.set_kernel_parts``), which needs no snap.
    """
    view = graph.GraphView(model)
    rows = []
    for name, layer, bn in _quantized_weighted_layers(view):
        if split_weights(layer, bn) is not None:
            rows.append({"layer": name, "changed": False,
                         "note": "split piecewise kernel: to_integer_graph keeps its bias to 2^-17 output steps "
                                 "(its own int32 scale s_out/2^16), so there is nothing to snap"})
            continue
        s_in = input_step(view, name)
        folded = export_weights(layer, bn, s_in, int4_weights)[0]
        if s_in is None:
            rows.append({"layer": name, "changed": False, "note": "float input: no integer bias"})
            continue
        accumulator_step = s_in * folded.step
        delta = np.round(folded.bias / accumulator_step) * accumulator_step - folded.bias
        changed = bool(np.any(np.abs(delta) > ON_GRID_TOLERANCE * accumulator_step))
        if not _move_folded_bias(layer, bn, delta) and changed:
            raise ExportError(f"{name}: its bias (from {bn.name if bn is not None else name}) has no variable "
                              "to snap onto the int32 grid (BatchNorm center=False and use_bias=False)")
        plan, grid = _output_plan(bn if bn is not None else layer)
        out_step = tensor_step(grid) if grid is not None else None
        rows.append({"layer": name, "changed": changed,
                     "max_accumulator_steps": float(np.max(np.abs(delta) / accumulator_step)),
                     "max_output_steps": (float(np.max(np.abs(delta))) / out_step if out_step else None),
                     "note": f"BatchNorm {bn.name} beta" if bn is not None else "bias"})
    return rows


#: ``guard_ties``: exact outputs closer than this (in output steps) to a rounding tie count as at
#: risk; Keras's float32 forward was measured up to ~1.4e-5 steps off the exact value
TIE_MARGIN = 1e-4
_NUDGES = (0, -1, 1, -2, 2)  # bias moves tried, in accumulator steps, smallest first


def _folded_bias_variable(weighted, bn):
    """``(variable, factor)`` through which ``weighted``'s BatchNorm-folded bias moves: adding ``d / factor``
    to the variable moves the folded bias by ``d`` (``bn``'s beta, factor 1; else the layer's own bias,
    factor = BatchNorm's gamma / sqrt(var + eps), or 1 without ``bn``), or None when neither exists."""
    inner = costs.inner_layer(weighted)
    bn_inner = costs.inner_layer(bn) if bn is not None else None
    if bn_inner is not None and getattr(bn_inner, "center", True) and bn_inner.beta is not None:
        return bn_inner.beta, 1.0
    if getattr(inner, "use_bias", False) and inner.bias is not None:
        return inner.bias, (fold.batch_norm_factors(bn_inner)[0] if bn_inner is not None else 1.0)
    return None


def _move_folded_bias(weighted, bn, delta):
    """Move ``weighted``'s BatchNorm-folded bias by ``delta`` (per output channel; channels whose
    BatchNorm factor is 0 cannot move); False when there is no variable to move."""
    found = _folded_bias_variable(weighted, bn)
    if found is None:
        return False
    variable, factor = found
    factor = np.broadcast_to(np.asarray(factor, np.float64), np.shape(delta))
    change = np.where(factor == 0, 0.0, np.asarray(delta, np.float64) / np.where(factor == 0, 1.0, factor))
    variable.assign((variable.numpy().astype(np.float64) + change).astype(np.float32))
    return True


def guard_ties(model, x, margin=TIE_MARGIN, int4_weights=False):
    """Move biases by whole accumulator steps away from rounding ties that examples ``x`` hit, in place.

    Keras's float32 forward and the integer model round the same exact value differently when it lies
    within ~1e-5 output steps of a tie. Constant image regions repeat one accumulator over many
    positions, so one such value can flip a whole region, and coarse grids downstream amplify it
    (docs/export.md, parity). This runs the IntegerGraph (XNNPACK arithmetic) over ``x`` in graph
    order; for each convolution / fully-connected output channel it counts exact values within
    ``margin`` steps of a tie and, if there are any, picks the bias move of 0, -1, +1, -2 or +2
    accumulator steps that leaves the fewest (the smallest move on equal counts). The move is made in
    Keras (BatchNorm beta or layer bias, so the bias stays on the int32 grid ``snap_biases`` made) and in
    the graph, and the pass goes on from the moved output. Call it after ``snap_biases`` (and with the
    same ``int4_weights``). Returns one row per layer moved: channels moved, values at risk before and
    after.
    """
    from tfq.export import verify
    from tfq.export.integer import PARTS_OPS
    if not (isinstance(margin, (int, float)) and 0 < margin < 0.5):
        raise ValueError(f"margin must be in (0, 0.5) output steps, got {margin!r}")
    view = graph.GraphView(model)
    graph_ = to_integer_graph(model, int4_weights=int4_weights)  # split PWLQ layers as exact parts (left alone)
    holders = verify.layer_tensors(model, graph_)
    # the layer holding a weighted layer's output tensor (its folded BatchNorm, if any) -> (layer, BatchNorm)
    weighted_of = {bn.name if bn is not None else name: (layer, bn)
                   for name, layer, bn in _quantized_weighted_layers(view)}
    env = {**graph_.constants, graph_.inputs[0]: verify.graph_input(graph_, x)}
    rows = []
    for idx, op in enumerate(graph_.ops):
        holder = holders.get(op["outputs"][0])
        weighted = weighted_of.get(holder.name) if holder is not None else None
        movable = (op["op"] in PARTS_OPS and not op["params"].get("parts") and len(op["inputs"]) > 2
                   and op["inputs"][2] >= 0 and weighted is not None
                   and _folded_bias_variable(*weighted) is not None)
        if movable:
            row = _guard_op(graph_, idx, op, env, holder.name, weighted, margin)
            if row is not None:
                rows.append(row)
        env.update(zip(op["outputs"], graph_.run_op(idx, env, arithmetic="xnnpack")))
    return rows


def _guard_op(graph, idx, op, env, name, weighted, margin):
    """``guard_ties`` for one op: exact outputs from the int32 accumulator, chosen moves applied."""
    from tfq.export.integer import accumulator, accumulator_steps
    bias_id = op["inputs"][2]
    bias = np.asarray(graph.constants[bias_id]).astype(np.int64)
    acc = accumulator(graph, idx, op, env)                # [..., n_out] exact sums, no bias
    n_out = acc.shape[-1]
    real_step = accumulator_steps(graph, op, n_out)       # one accumulator step in the layer's output units
    step = real_step / np.float64(graph.tensors[op["outputs"][0]].s)  # ... and in output steps
    flat = acc.reshape(-1, n_out)
    moves = np.zeros(n_out, np.int64)
    before = after = 0
    for c in range(n_out):
        def at_risk(d):
            v = (flat[:, c] + bias[c] + d) * step[c]
            return int(np.sum(np.abs(v - np.floor(v) - 0.5) < margin))
        risk = {d: at_risk(d) for d in _NUDGES}
        before += risk[0]
        best = min(_NUDGES, key=lambda d: (risk[d], abs(d)))
        after += risk[best]
        moves[c] = best
    if not moves.any():
        return None
    graph.constants[bias_id] = (bias + moves).astype(graph.constants[bias_id].dtype)
    graph._cache.pop(idx, None)
    _move_folded_bias(*weighted, moves * real_step)
    return {"layer": name, "op_index": idx, "channels_moved": int(np.count_nonzero(moves)),
            "largest_move_steps": int(np.max(np.abs(moves))), "values_at_risk_before": before,
            "values_at_risk_after": after}


def export_report(model, int4_weights=False, exact_hard_swish=False, approximate_piecewise=False) -> List[Dict[str, Any]]:
    """Per layer/tensor: grid, bits and what export did (BN folding, zero points, tables, the
    approximation of split piecewise kernels)."""
    return [dataclasses.asdict(e) for e in build_inference_model(model, int4_weights, exact_hard_swish,
                                                                 approximate_piecewise)[1]]


def to_tflite(model, path=None, int4_weights=False, int8_io=True, exact_hard_swish=False,
              approximate_piecewise=False) -> bytes:
    """Integer-only TFLite flatbuffer of a quantized model (see the module docstring).

    ``int4_weights``: store weights of <= 4 bits as INT4 (requires every such layer's codes in
    [-7, 7]); ``int8_io``: int8 input/output tensors (else float, with QUANTIZE/DEQUANTIZE only at
    the model boundary); ``exact_hard_swish``: hard-swish layers as exact int8 tables of the
    trained forward (parity; slower than TFLite's HARD_SWISH op, which rounds differently);
    ``approximate_piecewise``: PWLQ layers whose kernel is a sum of several integer parts (non-integer
    tail/centre ratio, or ``granularity="group"``) are re-quantized to plain per-channel int8 so TFLite
    runs them (not exact; ``export_report`` says so); by default they raise ``ExportError``, and
    ``to_integer_graph`` exports them exactly.
    Equal quantization zero-point and scale vectors are stored once in the returned flatbuffer
    (``tfq.export.flatbuffer.share_quantization_vectors``; MobileNetV2's int8 file is 6% smaller).
    Raises ``ExportError`` naming the layer when a layer cannot be exported.
    """
    export_model, _ = build_inference_model(model, int4_weights, exact_hard_swish, approximate_piecewise)
    converter = tf.lite.TFLiteConverter.from_keras_model(export_model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if int8_io:
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    if int4_weights:
        converter._experimental_low_bit_qat = True
    try:
        flatbuffer = converter.convert()
    except Exception as err:  # the converter's own message, with the model and layer it concerns
        layer = _layer_in_converter_message(err, export_model, model)
        where = f" at layer {layer!r}" if layer else ""
        raise ExportError(f"TFLite conversion of {model.name!r} failed{where}: {err}") from err
    check_integer_only(flatbuffer, model.name, allow_boundary=not int8_io)
    flatbuffer = share_quantization_vectors(flatbuffer)
    if path is not None:
        with open(path, "wb") as f:
            f.write(flatbuffer)
    return flatbuffer


def _converter_op_locations(err):
    """Op names (``model/layer/op@function``) the converter located the failure at: the structured
    ``ConverterError.errors[i].location`` (where the MLIR converter puts them; its message text
    often holds only the error) and any ``loc("...")`` quoted in the message."""
    names = []
    for error in getattr(err, "errors", None) or []:
        location = getattr(error, "location", None)
        if location is None:
            continue
        names += [call.name for call in location.call if call.name]
    names += re.findall(r'"([^"/]+/[^"@]*@[^"]*)"', str(err))
    return names


def _layer_in_converter_message(err, export_model, model):
    """The user's name of the first layer the converter's op locations (``model/layer/op@...``) name."""
    names = {layer.name for layer in export_model.layers}
    for location in _converter_op_locations(err):
        parts = location.split("@")[0].split("/")
        candidate = parts[1] if len(parts) > 2 else None
        if candidate in names:
            try:
                return costs.inner_layer(model.get_layer(candidate)).name
            except ValueError:
                return candidate
    return None


def op_names(flatbuffer):
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=flatbuffer)
    return [op["op_name"] for op in interp._get_ops_details()]


def check_integer_only(flatbuffer, name, allow_boundary=False):
    """Raise if the graph holds FAKE_QUANT, or QUANTIZE/DEQUANTIZE away from the model boundary."""
    from ai_edge_litert.interpreter import Interpreter
    interp = Interpreter(model_content=flatbuffer)
    inputs = {d["index"] for d in interp.get_input_details()}
    outputs = {d["index"] for d in interp.get_output_details()}
    bad = []
    for op in interp._get_ops_details():
        kind = op["op_name"]
        if kind == "FAKE_QUANT":
            bad.append(kind)
        elif kind in ("QUANTIZE", "DEQUANTIZE"):
            at_boundary = set(op["inputs"]) & inputs or set(op["outputs"]) & outputs
            if not (allow_boundary and at_boundary):
                bad.append(f"{kind} (tensor {list(op['outputs'])})")
    if bad:
        raise ExportError(f"{name}: exported graph is not integer-only; it holds {', '.join(bad)}")


def split_layers(model, int4_weights=False):
    """``{layer name: (SplitWeights, codes)}`` for every layer whose piecewise kernel needs several
    integer parts; ``codes`` are the approximate int8 codes ``to_tflite(..., approximate_piecewise=True)``
    stores for it (used to find its op in the flatbuffer)."""
    view = graph.GraphView(model)
    out = {}
    for name, layer, bn in _quantized_weighted_layers(view):
        split = split_weights(layer, bn)
        if split is not None:
            folded = export_weights(layer, bn, input_step(view, name), int4_weights, approximate_piecewise=True)[0]
            out[name] = (split, folded.codes)
    return out


def _tflite_kernel_layout(kind, op_name, codes):
    """A Keras-layout kernel (HWIO, HW C M, IO) in the layout of TFLite op ``op_name``, or None."""
    codes = np.asarray(codes)
    if kind == "Conv2D" and op_name == "CONV_2D":
        return np.transpose(codes, (3, 0, 1, 2))
    if kind == "DepthwiseConv2D" and op_name == "DEPTHWISE_CONV_2D":
        h, w, c, m = codes.shape
        return codes.reshape(1, h, w, c * m)
    if kind == "Dense" and op_name == "CONV_2D":  # per-channel Dense: a 1x1 convolution
        return codes.T[:, None, None, :]
    if kind == "Dense" and op_name == "FULLY_CONNECTED":
        return codes.T
    return None


def _find_weighted_op(graph_, name, kind, codes):
    """Index of the op whose weight constant holds ``codes`` (layer ``name``'s approximate kernel);
    ties between layers with identical codes are broken by the layer name in the op's tensor names."""
    found = []
    for i, op in enumerate(graph_.ops):
        weights = graph_.constants.get(op["inputs"][1]) if len(op["inputs"]) > 1 else None
        expected = _tflite_kernel_layout(kind, op["op"], codes) if weights is not None else None
        if expected is not None and weights.shape == expected.shape and np.array_equal(weights, expected):
            found.append(i)
    if len(found) > 1:
        named = [i for i in found if any(name in graph_.tensors[t].name
                                         for t in graph_.ops[i]["inputs"] + graph_.ops[i]["outputs"] if t >= 0)]
        found = named if named else found
    if len(found) != 1:
        raise ExportError(f"{name}: found {len(found)} {kind} ops holding its approximate kernel in the TFLite "
                          "graph (expected exactly one), so its exact integer parts cannot be placed; was the "
                          "flatbuffer made by to_tflite(model, approximate_piecewise=True) from this model?")
    return found[0]


def to_integer_graph(model, int4_weights=False, flatbuffer=None):
    """The model as an ``IntegerGraph`` (int8/int32 NumPy engine, TFLite reference semantics).

    Built from the same integer-only flatbuffer ``to_tflite`` emits (or ``flatbuffer``, which must
    come from ``to_tflite(model, ...)``), so both hold the same codes, int32 biases (activation zero
    points folded in by the kernels' ``x - z`` terms) and fixed-point multipliers; ``IntegerGraph.run``
    is bit-exact with TFLite's reference kernels. Exception: each PWLQ layer whose kernel needs several
    integer parts (``split_weights``) is exported through ``to_tflite(..., approximate_piecewise=True)``
    and its op then replaced by the exact parts (``IntegerGraph.set_kernel_parts``: int32 accumulators
    per part, one rounding), so those ops differ from TFLite by design and equal the Keras model.
    """
    from tfq.export.integer import IntegerGraph
    splits = split_layers(model, int4_weights)
    if flatbuffer is None:
        flatbuffer = to_tflite(model, int4_weights=int4_weights, approximate_piecewise=bool(splits))
    result = IntegerGraph.from_tflite(flatbuffer)
    for name, (split, codes) in splits.items():
        idx = _find_weighted_op(result, name, split.kind, codes)
        op_name = result.ops[idx]["op"]
        parts = [(_tflite_kernel_layout(split.kind, op_name, p.codes), p.scale) for p in split.parts]
        result.set_kernel_parts(idx, parts, split.bias, name=name)
    return result
