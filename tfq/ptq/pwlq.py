"""Piecewise linear post-training quantization of a Keras model (pwlq.txt; SPEC.md "PWLQ").

``pwlq(model, calibration_data, ...)`` returns a quantized model without any training:

1. the model is put in canonical form (``tfq.graph.canonicalize``) and every BatchNormalization
   that follows a Conv2D/DepthwiseConv2D/Dense is folded into it (``tfq.ptq.fold``; sec. 5);
2. every kernel is quantized by the NumPy core (``tfq.ptq.pwlq_core.quantize_channels``):
   eq. 3 per output channel (or per input-channel group, sec. 5.1.2) with the Gaussian /
   Laplacian breakpoint rule or the coarse-to-fine search (sec. 5.1.1), or the uniform
   per-channel baseline (``method="uniform"``); the first and last weighted layers stay 8-bit
   uniform per channel (``first_last_bits``);
3. bias correction (sec. 5.1.2, see ``BIAS_CORRECTIONS``);
4. activations: one asymmetric ``activation_bits`` grid per tensor (8 by default) from the
   calibration batches: per batch the lower median of the 10 smallest / largest values, averaged
   over batches (``pwlq_core.calibration_bounds``), widened to contain 0, integer zero point
   (outputs of sigmoid/softmax/tanh keep the fixed grid the scheme gives them);
5. the result is the same kind of model ``tfq.quantize_model`` builds (tfmot ``quantize_apply``
   with a ``tfq.schemes.TFQScheme``): wrappers hold fixed ``PWLQWeightQuantizer`` /
   ``FixedUniformWeightQuantizer`` weight quantizers and LSQ activation quantizers whose scale
   and integer offset are set from the calibration bounds, so ``predict``, ``tfq.costs``,
   export and ``tfq.quantize_scope()`` loading treat it like a trained model;
6. every bias is snapped onto the int32 grid of the exported integer model and hard-swish layers
   onto TFLite's int8 kernel, and biases move away from rounding ties the calibration examples hit
   (``tfq.export.snap_biases``, ``snap_hard_swish``, ``guard_ties``; ``snap_for_export=False`` skips
   them).

Each wrapped layer's kernel holds its quantized (bias-corrected) values, which lie on the
quantizer's grid: the forward returns them unchanged, and ``integer_grid`` re-quantizes them
unambiguously (no float32/float64 rounding tie can pick another code than the NumPy core).
Calibration statistics are taken on the folded float model.
"""
from __future__ import annotations

import dataclasses
import numbers
import sys
import types
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf
import tf_keras as keras

from tfq import costs, graph, schemes
from tfq.ptq import fold, pwlq_core
from tfq.quantizers import base as qbase
from tfq.quantizers import lsq
from tfq.quantizers.pwlq import FixedUniformWeightQuantizer, PWLQWeightQuantizer

#: ``bias_correction`` values. Per output channel, bias correction maps the quantized kernel to
#: ``alpha * w_q + d`` with ``alpha = std(w)/std(w_q)`` and ``d = mean(w) - alpha mean(w_q)``
#: (``pwlq_core.bias_correct``; restores each channel's mean and std). ``alpha`` always folds
#: into the grid's scales. ``d`` adds ``d * sum(inputs)`` to every output, which no weight grid
#: holds, so the modes differ in where it goes:
#:
#: * ``True`` / ``"bias"``: ``d`` times the expected receptive-field sum of the layer's input
#:   over the calibration data is added to the layer's bias (output mean restored in
#:   expectation; the model keeps plain ``PiecewiseGrid``/``UniformGrid`` weights and an
#:   int32 bias, exportable as one convolution);
#: * ``"exact"``: ``d`` is a per-channel ``shift`` of the weight quantizer (``ShiftedGrid``):
#:   the paper's float simulation; export needs a sum-of-inputs accumulator (eq. 13's
#:   ``<X_q, I>``);
#: * ``"scale"``: only ``alpha``; ``False``: none.
BIAS_CORRECTIONS = (False, True, "bias", "scale", "exact")
CALIBRATION_TOP_K = 10  # sec. 5: "top-10 median of minmax ranges"


def _check_bias_correction(value):
    if isinstance(value, np.bool_):
        value = bool(value)
    for allowed in BIAS_CORRECTIONS:
        if type(value) is type(allowed) and value == allowed:
            return "bias" if value is True else value
    raise ValueError(f"bias_correction must be one of {', '.join(map(repr, BIAS_CORRECTIONS))}; "
                     f"got {value!r}")


def _check_positive_int(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --- calibration data ----------------------------------------------------------------------

def calibration_batches(data, batch_size=64) -> List[np.ndarray]:
    """The calibration inputs as a list of float32 batches.

    ``data``: an array or tensor of examples (split into ``batch_size`` batches), a
    ``tf.data.Dataset`` of batches, or a list/iterable of batches; dataset or list elements
    that are tuples ``(x, y, ...)`` contribute ``x``. Raises ValueError when there is no
    example, or a batch is empty or holds NaN/Inf.
    """
    batch_size = _check_positive_int(batch_size, "batch_size")
    if isinstance(data, (np.ndarray, tf.Tensor)):
        arr = np.asarray(data)
        if arr.ndim == 0 or arr.shape[0] == 0:
            raise ValueError("calibration_data is empty: post-training quantization needs at least one "
                             "example to calibrate the activations")
        items = [arr[i:i + batch_size] for i in range(0, arr.shape[0], batch_size)]
    elif isinstance(data, (str, bytes, dict)) or not hasattr(data, "__iter__"):
        raise ValueError("calibration_data must be an array, a tensor, a tf.data.Dataset or an iterable of "
                         f"batches, got {type(data).__name__}")
    else:
        items = data
    batches = []
    for i, item in enumerate(items):
        if isinstance(item, (tuple, list)) and not isinstance(data, (np.ndarray, tf.Tensor)):
            if not item:
                raise ValueError(f"calibration_data batch {i} is an empty tuple")
            item = item[0]
        try:
            batch = np.asarray(item, dtype=np.float32)
        except (TypeError, ValueError) as err:
            raise ValueError(f"calibration_data batch {i} is not numeric: {err}") from None
        if batch.ndim == 0 or batch.shape[0] == 0:
            raise ValueError(f"calibration_data batch {i} is empty")
        if not np.all(np.isfinite(batch)):
            raise ValueError(f"calibration_data batch {i} contains NaN or Inf values")
        batches.append(batch)
    if not batches:
        raise ValueError("calibration_data is empty: post-training quantization needs at least one "
                         "batch to calibrate the activations")
    return batches


def _check_finite_weights(model):
    bad = [w.name for w in model.weights if w.dtype.is_floating and not np.all(np.isfinite(w.numpy()))]
    if bad:
        raise ValueError(f"model weights contain NaN or Inf values: {', '.join(bad)}; quantization "
                         "needs finite weights")


# --- per-layer plan ------------------------------------------------------------------------

@dataclasses.dataclass
class LayerPlan:
    """What ``pwlq`` decided for one weighted layer (canonical name ``name``)."""

    name: str
    quantizer: qbase.TFQQuantizer
    values: Dict[str, np.ndarray]      # ``quantizer.assign`` arguments
    kernel: np.ndarray                 # quantized kernel on the grid (without ``shift``)
    shift_kernel: Optional[np.ndarray]  # ``d`` broadcast to the kernel ("bias" mode), else None


def _broadcast_channels(values, axes, shape):
    target = [1] * len(shape)
    for a in axes:
        target[a] = shape[a]
    return np.broadcast_to(np.asarray(values).reshape(target), shape)


def plan_layer(layer, method, bits, granularity, mode, breakpoint="gaussian", bits_mean="piece",
               integer_tail_ratio=False, group_size=None):
    """Quantize ``layer``'s kernel with the core (``method`` "pwlq" or "uniform") and describe
    the quantizer, its parameters and the layer's new kernel."""
    kind = type(layer).__name__
    axes = pwlq_core.channel_axes_for(kind)
    kernel = np.asarray(getattr(layer, "depthwise_kernel" if kind == "DepthwiseConv2D" else "kernel").numpy(),
                        np.float64)
    core_mode = {False: False, "scale": "scale", "exact": "exact", "bias": "exact"}[mode]
    _, result = pwlq_core.quantize_channels(
        kernel, axes, bits, breakpoint=breakpoint, granularity=granularity, method=method,
        bias_correction=core_mode, bits_mean=bits_mean, integer_tail_ratio=integer_tail_ratio,
        group_size=group_size)
    grid = result.grid
    grid_axes = (grid.axis,) if isinstance(grid.axis, int) else tuple(grid.axis)
    on_grid = dataclasses.replace(result, offset=None).dequantize()
    shift_axis = axes if mode == "exact" else None
    if method == "pwlq":
        quantizer = PWLQWeightQuantizer(bits, bits_mean, per_axis=grid_axes, shift_axis=shift_axis)
        values = {"breakpoint": grid.breakpoint, "centre_scale": grid.centre_scale,
                  "tail_scale": grid.tail_scale}
    else:
        quantizer = FixedUniformWeightQuantizer(bits, per_axis=grid_axes, shift_axis=shift_axis)
        values = {"scale": grid.scale}
    if mode == "exact":
        values["shift"] = result.offset
    shift_kernel = None
    if mode == "bias":
        shift_kernel = _broadcast_channels(result.offset, axes, kernel.shape).astype(np.float32)
    return LayerPlan(layer.name, quantizer, values, on_grid.astype(np.float32), shift_kernel)


class PTQQuantizers(schemes.MethodQuantizers):
    """The scheme's quantizers for a PTQ model: each weighted layer's fixed quantizer from its
    ``LayerPlan`` (by layer name), asymmetric LSQ activation quantizers (configuration 4,
    min-max init) whose scale and offset ``pwlq`` sets from the calibration bounds."""

    name = "pwlq-ptq"

    def __init__(self, plans: Dict[str, LayerPlan]):
        self.plans = plans

    def weight_quantizer(self, layer, bits):
        if layer.name not in self.plans:
            raise ValueError(f"layer {layer.name!r} has no post-training quantization plan")
        quantizer = self.plans[layer.name].quantizer
        return type(quantizer).from_config(quantizer.get_config())

    def activation_quantizer(self, bits, kind):
        return lsq.activation_quantizer(bits, config=4, init="minmax")


# --- calibration ---------------------------------------------------------------------------

def _source_layer_name(view, name):
    """Canonical name of the float layer whose output the quantizer on layer ``name`` holds."""
    layer = view.layers[name]
    if type(layer).__name__ == "QuantizeLayer":
        name = view.producers[name][0]
        layer = view.layers[name]
    return costs.inner_layer(layer).name


def activation_bounds_to_lsq(low, high, quantizer):
    """(scale, offset) of an asymmetric LSQ quantizer covering ``[min(low, 0), max(high, 0)]``
    with an offset of whole steps (``offset = -z * scale``, integer zero point ``z``)."""
    if not getattr(quantizer, "learn_offset", False):
        raise TypeError(f"expected an asymmetric LSQ activation quantizer, got {quantizer!r}")
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    steps = quantizer.qmax - quantizer.qmin
    scale = (high - low) / steps if high > low else 1.0
    zero_point = int(np.clip(np.round(quantizer.qmin - low / scale), quantizer.qmin, quantizer.qmax))
    return scale, -zero_point * scale


def _calibrate(float_model, quantized, batches, plans):
    """Activation bounds of every held tensor and (``"bias"`` mode) the expected response of
    every layer's shift kernel, from one pass of the float model over ``batches``."""
    view = graph.GraphView(quantized)
    held = {}
    for name, layer in view.layers.items():
        quantizer, qvars = costs.output_quantizer(layer)
        if quantizer is not None and quantizer.data_dependent_init:  # not the ops' fixed grids
            held[name] = (_source_layer_name(view, name), quantizer, qvars)
    sources = sorted({source for source, _, _ in held.values()})
    outputs = [float_model.get_layer(s).output for s in sources]
    shift_names = [n for n, plan in plans.items() if plan.shift_kernel is not None]
    for name in shift_names:
        layer = float_model.get_layer(name)
        cfg = dict(layer.get_config(), name=f"{name}_pwlq_shift", use_bias=False, activation="linear")
        probe = type(layer).from_config(cfg)
        out = probe(layer.input)
        probe.set_weights([plans[name].shift_kernel])
        outputs.append(out)
    recorder = keras.Model(float_model.inputs, outputs)
    lows = {s: [] for s in sources}
    highs = {s: [] for s in sources}
    shift_sums = {n: 0.0 for n in shift_names}
    shift_counts = {n: 0 for n in shift_names}
    for batch in batches:
        values = recorder(batch, training=False)
        values = values if isinstance(values, (list, tuple)) else [values]
        for s, v in zip(sources, values):
            low, high = pwlq_core.calibration_bounds([v.numpy()], k=CALIBRATION_TOP_K)
            lows[s].append(low)
            highs[s].append(high)
        for n, v in zip(shift_names, values[len(sources):]):
            v = np.asarray(v.numpy(), np.float64)
            v = v.reshape(-1, v.shape[-1])
            shift_sums[n] = shift_sums[n] + v.sum(axis=0)
            shift_counts[n] += v.shape[0]
    bounds = {s: (float(np.mean(lows[s])), float(np.mean(highs[s]))) for s in sources}
    for name, (source, quantizer, qvars) in held.items():
        scale, offset = activation_bounds_to_lsq(*bounds[source], quantizer)
        quantizer.assign_scale(qvars, scale)
        qvars["offset"].assign(offset)
        qvars["initialized"].assign(True)
    shift_means = {n: shift_sums[n] / shift_counts[n] for n in shift_names}
    return bounds, shift_means


# --- the API -------------------------------------------------------------------------------

#: calibration examples ``pwlq`` gives ``tfq.export.guard_ties`` (``snap_for_export``)
TIE_GUARD_CALIBRATION_EXAMPLES = 256


def pwlq(model, calibration_data, weight_bits=4, activation_bits=8, breakpoint="gaussian",
         granularity="channel", bias_correction=True, bits_mean="piece", method="pwlq",
         first_last_bits=8, integer_tail_ratio=False, group_size=None, batch_size=64, snap_for_export=True):
    """Post-training quantization of a float Keras 2 model (see module docstring).

    Args:
      model: float Sequential or Functional model (not modified).
      calibration_data: example inputs (see ``calibration_batches``); the paper uses 512.
      weight_bits: 2..8; for "pwlq" with ``bits_mean``: "piece" = bits per piece (tables 1-2;
        each weight also stores a sign and a region bit), "comp" = pieces of weight_bits-1,
        "stor" = pieces of weight_bits-2 (table 4).
      activation_bits: bits of every activation grid (2..8; per tensor, asymmetric).
      breakpoint: "gaussian", "laplacian" or "search" (method "pwlq" only).
      granularity: "channel" or "group" (input-channel groups of ``group_size``, default 32 when
        k_h*k_w < 9 else 256).
      bias_correction: see ``BIAS_CORRECTIONS`` (default True: std into the grid, mean into the
        bias).
      method: "pwlq" or "uniform" (symmetric per-channel max-abs baseline, same calibration).
      first_last_bits: bits of the uniform per-channel grid of the first and last weighted
        layers (and of their input activations), or None to treat them like the others.
      integer_tail_ratio: make every tail scale an integer multiple of its centre scale with all
        codes within int8, so each layer exports as one int8 convolution (method "pwlq").
      batch_size: batch size used to split an array of calibration examples.
      snap_for_export: step 6: move every (bias-corrected) bias onto the int32 grid the exported
        integer model adds (``tfq.export.snap_biases``), make hard-swish layers compute TFLite's
        int8 kernel (``tfq.export.snap_hard_swish``) and move biases away from the rounding ties the
        first ``TIE_GUARD_CALIBRATION_EXAMPLES`` calibration examples hit (``tfq.export.guard_ties``),
        so Keras computes what TFLite computes (parity figures in docs/pwlq.md). False keeps the
        model as bias correction left it.

    Returns the quantized model (tfmot wrappers; load with ``tfq.quantize_scope()``).
    """
    from tensorflow_model_optimization.python.core.quantization.keras import quantize as tfmot_quantize

    from tfq.api import annotate_model, quantize_scope

    method = pwlq_core._check_choice(method, "method", pwlq_core.METHODS)
    breakpoint = pwlq_core._check_choice(breakpoint, "breakpoint", pwlq_core.BREAKPOINTS)
    granularity = pwlq_core._check_choice(granularity, "granularity", pwlq_core.GRANULARITIES)
    mode = _check_bias_correction(bias_correction)
    integer_tail_ratio = pwlq_core._check_choice(integer_tail_ratio, "integer_tail_ratio", (False, True))
    snap_for_export = pwlq_core._check_choice(snap_for_export, "snap_for_export", (False, True))
    if method == "pwlq":
        pwlq_core.bits_per_piece(weight_bits, bits_mean)  # validates weight_bits and bits_mean
    else:
        qbase.check_bits(weight_bits, "weight_bits")
        pwlq_core._check_choice(bits_mean, "bits_mean", pwlq_core.BITS_MEANS)
        changed = [name for name, value, default in (("breakpoint", breakpoint, "gaussian"),
                                                     ("bits_mean", bits_mean, "piece"),
                                                     ("integer_tail_ratio", integer_tail_ratio, False))
                   if value != default]
        if changed:
            raise ValueError(f"{', '.join(changed)} applies to method='pwlq' only (method='uniform' has no "
                             "pieces)")
    activation_bits = qbase.check_bits(activation_bits, "activation_bits")
    if first_last_bits is not None:
        first_last_bits = qbase.check_bits(first_last_bits, "first_last_bits")
    if group_size is not None:
        group_size = _check_positive_int(group_size, "group_size")
        if granularity != "group":
            raise ValueError("group_size applies to granularity='group' only")
    batches = calibration_batches(calibration_data, batch_size)

    functional = graph.to_functional(model)
    graph.check_structure(functional)
    schemes.check_supported(functional)
    if len(functional.inputs) != 1:
        raise ValueError(f"pwlq supports models with one input; {functional.name!r} has "
                         f"{len(functional.inputs)}")
    _check_finite_weights(functional)
    canonical, _ = graph.canonicalize(functional)
    folded = fold.fold_batch_norms(canonical, add_missing_biases=mode == "bias")

    view = graph.GraphView(folded)
    weighted = [n for n in view.layers if view.type_name(n) in schemes.WEIGHTED]
    first, last = schemes.TFQScheme._first_last(view, weighted)
    plans = {}
    for name in weighted:
        if first_last_bits is not None and (name in first or name in last):
            plans[name] = plan_layer(view.layers[name], "uniform", first_last_bits, "channel", mode)
        else:
            plans[name] = plan_layer(view.layers[name], method, weight_bits, granularity, mode, breakpoint,
                                     bits_mean, integer_tail_ratio, group_size)

    scheme = schemes.TFQScheme(PTQQuantizers(plans), weight_bits=weight_bits, activation_bits=activation_bits,
                               first_last_bits=first_last_bits or activation_bits, intermediate_bits=8)
    with quantize_scope():
        quantized = tfmot_quantize.quantize_apply(annotate_model(folded), scheme)

    _, shift_means = _calibrate(folded, quantized, batches, plans)
    for layer in quantized.layers:
        for weight, quantizer, qvars in costs.weight_quantizers(layer):
            inner = costs.inner_layer(layer)
            plan = plans[inner.name]
            quantizer.assign(qvars, **plan.values)
            weight.assign(plan.kernel)
            if inner.name in shift_means:
                inner.bias.assign(inner.bias.numpy() + shift_means[inner.name].astype(np.float32))
    if snap_for_export:
        from tfq.export.tflite import ExportError, guard_ties, snap_biases, snap_hard_swish
        try:
            snap_biases(quantized)
        except ExportError as err:
            raise ExportError(f"pwlq(snap_for_export=True): {err}; pass snap_for_export=False for a model you "
                              "will not export") from err
        snap_hard_swish(quantized)
        guard_ties(quantized, np.concatenate(batches)[:TIE_GUARD_CALIBRATION_EXAMPLES])
    return quantized


class _CallableModule(types.ModuleType):
    """``tfq.ptq.pwlq`` is both this module (ARCHITECTURE.md's ``ptq/pwlq.py``) and the function
    users call: once imported, Python binds the package attribute to the module, so the module
    forwards calls to ``pwlq``."""

    def __call__(self, *args, **kwargs):
        return pwlq(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
