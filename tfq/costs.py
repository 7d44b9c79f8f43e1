"""Costs of a quantized model: per-layer bits, weight memory and BitOPs.

Read from the quantizers' ``effective_bits`` (so mixed-precision methods report their current
precision, and ``weight_memory``/``bitops`` are differentiable wherever ``effective_bits`` is —
DDQ's memory loss and AdaQAT's BitOPs term use them):

* weight memory (bits) = sum over weighted layers of ``params x weight bits`` (ddq.txt eq. 6 with
  bits in place of its printed 2^s: storage grows linearly with the bit-width);
* BitOPs = sum over weighted layers of ``MACs x weight bits x input activation bits``
  (adaqat.txt eq. 4; MACs per example). A float input counts as 32 bits.

``params`` counts the kernel only (biases stay int32 at export and are not quantized).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Optional

import numpy as np
import tensorflow as tf

from tfq import graph

FLOAT_BITS = 32.0


@dataclasses.dataclass
class LayerCost:
    """One weighted layer of a quantized model."""

    name: str
    kind: str
    params: int
    macs: int
    weight_quantizer: Any = None
    weight_vars: Optional[Dict[str, tf.Variable]] = None
    activation_quantizer: Any = None
    activation_vars: Optional[Dict[str, tf.Variable]] = None


def inner_layer(layer):
    """The wrapped Keras layer of a tfmot QuantizeWrapper (the layer itself otherwise)."""
    return getattr(layer, "layer", layer) if type(layer).__name__.startswith("QuantizeWrapper") else layer


def output_quantizer(layer):
    """(quantizer, variables) quantizing ``layer``'s output, or (None, None)."""
    kind = type(layer).__name__
    if kind == "QuantizeLayer":
        return layer.quantizer, layer.quantizer_vars
    if kind.startswith("QuantizeWrapper") and getattr(layer, "_output_quantizers", None):
        return layer._output_quantizers[0], layer._output_quantizer_vars
    return None, None


def weight_quantizers(layer):
    """[(weight variable, quantizer, quantizer variables)] of a QuantizeWrapper."""
    return list(getattr(layer, "_weight_vars", []) or [])


def input_quantizer(view, name):
    """(quantizer, variables) of the grid holding the input of layer ``name`` (first input),
    looking back through value-preserving layers; (None, None) for a float input."""
    producers = view.producers[name]
    while producers:
        producer = view.layers[producers[0]]
        quantizer, qvars = output_quantizer(producer)
        if quantizer is not None:
            return quantizer, qvars
        if type(inner_layer(producer)).__name__ not in graph.VALUE_PRESERVING:
            return None, None
        producers = view.producers[producers[0]]
    return None, None


def _macs(layer, params, shape_source=None):
    kind = type(layer).__name__
    out_shape = (shape_source or layer).output_shape
    if isinstance(out_shape, list):
        out_shape = out_shape[0]
    spatial = int(np.prod([d for d in out_shape[1:-1] if d is not None])) if len(out_shape) > 2 else 1
    if kind in ("Conv2D", "Conv1D", "DepthwiseConv2D"):
        return spatial * params  # every kernel weight is used once per output position
    return params  # Dense: one MAC per weight (per example, per leading position)


def layer_costs(model) -> List[LayerCost]:
    """A ``LayerCost`` for every Conv/DepthwiseConv/Dense layer of ``model`` (quantized or float)."""
    from tfq import configs
    view = graph.GraphView(model)
    rows = []
    for name, layer in view.layers.items():
        inner = inner_layer(layer)
        kind = type(inner).__name__
        attribute = configs.KERNEL_ATTRIBUTES.get(kind)
        if attribute is None:
            continue
        kernel = getattr(inner, attribute)
        params = int(np.prod(kernel.shape))
        w_q, w_vars = None, None
        for _, quantizer, qvars in weight_quantizers(layer):
            w_q, w_vars = quantizer, qvars
        a_q, a_vars = input_quantizer(view, name)
        # the wrapper's output shape: a wrapped layer loaded from h5/SavedModel has no node of its own
        rows.append(LayerCost(name, kind, params, _macs(inner, params, layer), w_q, w_vars, a_q, a_vars))
    return rows


def weight_bits(cost: LayerCost):
    if cost.weight_quantizer is None:
        return tf.constant(FLOAT_BITS)
    return tf.cast(cost.weight_quantizer.effective_bits(cost.weight_vars), tf.float32)


def activation_bits(cost: LayerCost):
    if cost.activation_quantizer is None or not hasattr(cost.activation_quantizer, "effective_bits"):
        return tf.constant(FLOAT_BITS)
    return tf.cast(cost.activation_quantizer.effective_bits(cost.activation_vars), tf.float32)


def weight_memory(model, costs=None):
    """Total weight memory in bits (float32 tensor)."""
    costs = layer_costs(model) if costs is None else costs
    return tf.add_n([c.params * weight_bits(c) for c in costs]) if costs else tf.constant(0.0)


def bitops(model, costs=None):
    """Sum of MACs x weight bits x activation bits over weighted layers (float32 tensor)."""
    costs = layer_costs(model) if costs is None else costs
    return (tf.add_n([float(c.macs) * weight_bits(c) * activation_bits(c) for c in costs])
            if costs else tf.constant(0.0))


def summary(model) -> List[Dict[str, Any]]:
    """Per-layer rows: name, type, params, MACs, weight/activation bits, weight memory (bytes,
    packed at the effective bit-width) and BitOPs; a final ``TOTAL`` row."""
    rows = []
    for c in layer_costs(model):
        wb, ab = float(weight_bits(c)), float(activation_bits(c))
        rows.append({"layer": c.name, "type": c.kind, "params": c.params, "macs": c.macs,
                     "weight_bits": wb, "activation_bits": ab,
                     "weight_bytes": c.params * wb / 8.0, "bitops": c.macs * wb * ab})
    rows.append({"layer": "TOTAL", "type": "", "params": sum(r["params"] for r in rows),
                 "macs": sum(r["macs"] for r in rows), "weight_bits": None, "activation_bits": None,
                 "weight_bytes": sum(r["weight_bytes"] for r in rows), "bitops": sum(r["bitops"] for r in rows)})
    return rows


def format_summary(rows) -> str:
    """``summary`` rows as a fixed-width text table."""
    head = f"{'layer':32s} {'type':16s} {'params':>9s} {'MACs':>11s} {'W':>5s} {'A':>5s} {'bytes':>10s} {'BitOPs':>12s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        wb = "" if r["weight_bits"] is None else f"{r['weight_bits']:.0f}"
        ab = "" if r["activation_bits"] is None else f"{r['activation_bits']:.0f}"
        lines.append(f"{r['layer'][:32]:32s} {r['type'][:16]:16s} {r['params']:9d} {r['macs']:11d} {wb:>5s} "
                     f"{ab:>5s} {r['weight_bytes']:10.0f} {r['bitops']:12.3e}")
    return "\n".join(lines)
