"""Parity of an exported model: Keras quantized model vs TFLite (XNNPACK and reference kernels)
vs IntegerGraph, measured in output steps (SPEC "Export rules", acceptance).

A graph with kernel-parts ops (split PWLQ layers, ``IntegerGraph`` module docstring) differs from
the TFLite reference kernels by design (TFLite holds an approximation of those layers), so it is
compared with the Keras model directly and ``passes`` judges it that way, with the IntegerGraph in
XNNPACK arithmetic (``report["integer_graph_xnnpack"]``): the reference kernels' double-rounding
requantization (MEAN, MUL, convolutions) moves outputs by a step where Keras and XNNPACK round once."""
from __future__ import annotations

import numpy as np


def _interpreter(flatbuffer, reference):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    kwargs = {"experimental_op_resolver_type": OpResolverType.BUILTIN_REF} if reference else {}
    interp = Interpreter(model_content=flatbuffer, **kwargs)
    interp.allocate_tensors()
    return interp


def quantize_input(x, detail):
    """Float inputs -> the TFLite input tensor's dtype (int8 codes when it is quantized)."""
    scale, zero_point = detail["quantization"]
    if detail["dtype"] == np.int8:
        return np.clip(np.round(np.asarray(x, np.float64) / scale) + zero_point, -128, 127).astype(np.int8)
    return np.asarray(x, detail["dtype"])


def graph_input(graph, x):
    """Float inputs ``x`` as the codes of ``graph``'s (single) input tensor (``quantize_input``)."""
    spec = graph.tensors[graph.inputs[0]]
    return quantize_input(x, {"quantization": (spec.s, spec.z) if spec.quantized else (0.0, 0),
                              "dtype": np.dtype(spec.dtype).type})


def run_tflite(flatbuffer, x, reference=False):
    """Outputs of a single-input, single-output TFLite model, one example at a time (batch 1)."""
    interp = _interpreter(flatbuffer, reference)
    inp, out = interp.get_input_details()[0], interp.get_output_details()[0]
    xq = quantize_input(x, inp)
    ys = []
    for k in range(len(xq)):
        interp.set_tensor(inp["index"], xq[k:k + 1])
        interp.invoke()
        ys.append(interp.get_tensor(out["index"])[0].copy())
    return np.stack(ys), interp


def output_steps(values, detail):
    """Real output values (Keras) in units of the TFLite output tensor's step, i.e. as codes."""
    scale, zero_point = detail["quantization"]
    values = np.asarray(values, np.float64)
    return values / scale + zero_point if scale else values


def tflite_steps(outputs, detail):
    """TFLite outputs as codes: int8 outputs already are; float outputs are converted."""
    if detail["dtype"] == np.int8:
        return np.asarray(outputs, np.float64)
    return output_steps(outputs, detail)


def _compare(keras_steps, other_steps, margin_steps=2.0):
    diff = np.abs(keras_steps - other_steps)
    flat_k = keras_steps.reshape(len(keras_steps), -1)
    top2 = np.sort(flat_k, axis=1)[:, -2:] if flat_k.shape[1] > 1 else None
    confident = (top2[:, 1] - top2[:, 0] > margin_steps + 1e-3) if top2 is not None else np.ones(len(flat_k), bool)
    agree = flat_k.argmax(1) == other_steps.reshape(len(other_steps), -1).argmax(1)
    return {"max_step_difference": float(diff.max()),
            "within_one_step": float(np.mean(diff <= 1.0 + 1e-3)),
            "exact_share": float(np.mean(diff <= 1e-3)),
            "argmax_agreement": float(np.mean(agree[confident])) if confident.any() else None,
            "argmax_compared": int(confident.sum())}


def verify(model, tflite_bytes, x, graph=None) -> dict:
    """Keras quantized model vs TFLite (XNNPACK = the default runtime, and reference kernels) vs
    IntegerGraph on inputs ``x`` (float, as the Keras model takes them).

    Returns a dict: per runtime the largest difference to Keras in output steps, the share of
    values within one step, the exact share, argmax agreement over examples whose Keras top-2
    margin exceeds two steps; the same for the IntegerGraph against Keras (``integer_graph``, and
    ``integer_graph_xnnpack`` for the graph run with ``arithmetic="xnnpack"``);
    IntegerGraph vs reference kernels: exact-match count and the number of kernel-parts ops (not
    expected to match when > 0); the IntegerGraph run with ``arithmetic="xnnpack"`` vs the XNNPACK
    interpreter (``integer_graph_vs_xnnpack``: exact matches, values, bit_exact); XNNPACK
    partitions and ops left outside XNNPACK. Without ``graph``
    it is ``tfq.export.to_integer_graph(model, flatbuffer=tflite_bytes)`` (exact for split layers).
    """
    from tfq.export import bench
    x = np.asarray(x, np.float32)
    keras_out = np.asarray(model.predict(x, verbose=0, batch_size=256))
    xnn, xnn_interp = run_tflite(tflite_bytes, x, reference=False)
    ref, _ = run_tflite(tflite_bytes, x, reference=True)
    out_detail = xnn_interp.get_output_details()[0]
    keras_steps = output_steps(keras_out, out_detail)
    if graph is None:
        from tfq.export.tflite import to_integer_graph
        graph = to_integer_graph(model, flatbuffer=tflite_bytes)
    inp = xnn_interp.get_input_details()[0]
    xq = quantize_input(x, inp)  # in chunks: exact-table activations hold [N, ..., jumps] tensors
    ig = np.concatenate([np.asarray(graph.run(xq[k:k + 32])) for k in range(0, len(xq), 32)])
    ig_xnn = np.concatenate([np.asarray(graph.run(xq[k:k + 32], arithmetic="xnnpack"))
                             for k in range(0, len(xq), 32)])
    coverage = bench.xnnpack_coverage(xnn_interp._get_ops_details())
    report = {
        "examples": int(len(x)),
        "output_scale": float(out_detail["quantization"][0]),
        "xnnpack": _compare(keras_steps, tflite_steps(xnn, out_detail)),
        "reference": _compare(keras_steps, tflite_steps(ref, out_detail)),
        "integer_graph": _compare(keras_steps, tflite_steps(ig, out_detail)),
        "integer_graph_xnnpack": _compare(keras_steps, tflite_steps(ig_xnn, out_detail)),
        "integer_graph_vs_reference": {"exact_matches": int(np.sum(ig == ref)), "values": int(ref.size),
                                       "bit_exact": bool(np.array_equal(ig, ref)),
                                       "kernel_parts_ops": len(graph.parts_ops())},
        "integer_graph_vs_xnnpack": {"exact_matches": int(np.sum(ig_xnn == xnn)), "values": int(xnn.size),
                                     "bit_exact": bool(np.array_equal(ig_xnn, xnn))},
        "xnnpack_partitions": coverage["xnnpack_partitions"],
        "ops_outside_xnnpack": sorted({o["op"] for o in coverage["ops_outside_xnnpack"]}),
        "op_counts": coverage["op_counts"],
    }
    return report


def _accepts(r, within, argmax):
    return r["within_one_step"] >= within and (r["argmax_agreement"] is None or r["argmax_agreement"] >= argmax)


def passes(report, within=0.999, argmax=0.999):
    """The export acceptance of SPEC.md on the default (XNNPACK) runtime, and IntegerGraph exactness.
    With kernel-parts ops (split PWLQ layers, whose TFLite form is an approximation) the IntegerGraph
    itself, in XNNPACK arithmetic, must meet the acceptance against Keras instead."""
    if report["integer_graph_vs_reference"].get("kernel_parts_ops"):
        return _accepts(report["integer_graph_xnnpack"], within, argmax)
    return _accepts(report["xnnpack"], within, argmax) and report["integer_graph_vs_reference"]["bit_exact"]


# ---- teacher-forced divergence, op by op -------------------------------------------------------

def _inner(layer):
    return getattr(layer, "layer", layer)  # tfmot QuantizeWrapper -> the wrapped layer


def _layer_output(model, layer):
    """The output of ``layer``'s node inside ``model`` (a layer may be shared with other models)."""
    for k in range(len(layer._inbound_nodes)):
        if f"{layer.name}_ib-{k}" in model._network_nodes:
            return layer.get_output_at(k)
    return layer.output


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _names_in(layer):
    """Path components a TFLite tensor of ``layer`` carries: its name and, for a tfmot wrapper
    ``quant_<name>``, the wrapped layer's ``<name>``."""
    names = {layer.name}
    if layer.name.startswith("quant_"):
        names.add(layer.name[len("quant_"):])
    return names


def layer_tensors(model, graph):
    """``{tensor_id: layer}``: the IntegerGraph tensor holding each Keras layer's output.

    A layer's tensor is an int8 op output whose name (first ``;`` part) has the layer's name, or
    the wrapped name for tfmot wrappers ``quant_<name>``, as a path component, with the same number
    of values per example; of several (a MUL and the MINIMUM/MAXIMUM clamps after it, a
    convolution and a RESHAPE) the last one in graph order. A BatchNormalization folded into the
    layer before it takes that layer's tensor (its ``.../add``), which then has none of its own."""
    import tf_keras as keras
    produced = {}
    for idx, op in enumerate(graph.ops):
        for t in op["outputs"]:
            spec = graph.tensors[t]
            if spec.dtype == "int8" and spec.quantized:
                produced[t] = idx
    layers = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
    found = {}
    for layer in layers:
        size = int(np.prod(_layer_output(model, layer).shape[1:]))
        names = _names_in(layer)
        hits = [t for t in produced
                if any(f"/{n}/" in graph.tensors[t].name.split(";")[0] + "/" for n in names)
                and int(np.prod(graph.tensors[t].shape[1:])) == size]
        if hits:
            found[layer.name] = max(hits, key=lambda t: produced[t])
    by_name = {l.name: l for l in layers}
    for layer in layers:
        if isinstance(_inner(layer), keras.layers.BatchNormalization) and layer.name not in found:
            inbound = [l for node in layer._inbound_nodes[:1] for l in _as_list(node.inbound_layers)]
            if len(inbound) == 1 and inbound[0].name in found:
                found[layer.name] = found.pop(inbound[0].name)
    return {t: by_name[name] for name, t in found.items()}


def _forced_chain(graph, idx, forced):
    """Ops (indices) computed from the last Keras-forced tensors up to op ``idx`` inclusive."""
    producer = {t: i for i, op in enumerate(graph.ops) for t in op["outputs"]}
    chain, pending = set(), [idx]
    while pending:
        i = pending.pop()
        if i in chain:
            continue
        chain.add(i)
        pending.extend(producer[t] for t in graph.ops[i]["inputs"]
                       if t in producer and t not in forced and t not in graph.constants)
    return sorted(chain)


def locate_divergence(model, flatbuffer, x, arithmetic="xnnpack", graph=None, batch_size=32):
    """Where the integer model parts from Keras, op by op, with teacher forcing.

    The IntegerGraph (``graph``, default ``tfq.export.to_integer_graph(model, flatbuffer=...)``) runs
    op by op in graph order with ``arithmetic`` ("xnnpack" = what LiteRT computes by default, or
    "reference"; ``IntegerGraph.run``). After each op whose output tensor holds a Keras layer's
    output (``layer_tensors``) that tensor is compared with Keras's output in steps of its grid,
    ``y / s + z`` rounded, and then replaced by those Keras codes: every op reads Keras's codes for
    each input that has a Keras counterpart, so each row is that op's own error (with the ops in
    ``chain``: those between the forced inputs and the tensor, e.g. a MUL and its clamps).

    This needs Keras outputs on the tensor's grid (quantized layer outputs); ``off_grid`` is the
    largest distance of Keras's ``y / s + z`` to an integer, so a row with a large ``off_grid``
    compares a Keras tensor the integer model does not hold.

    Returns rows in graph order, one per matched op: ``op_index``, ``op``, ``layer``, ``tensor``
    (name), ``chain`` (op types, ``>``-joined), ``values``, ``differing`` (share of values whose
    codes differ), ``beyond_one_step`` (share more than one step apart), ``max_steps``, ``off_grid``.
    """
    import tf_keras as keras
    from tfq.export.integer import ARITHMETICS
    if arithmetic not in ARITHMETICS:
        raise ValueError(f"arithmetic must be one of {', '.join(repr(a) for a in ARITHMETICS)}; got {arithmetic!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if graph is None:
        from tfq.export.tflite import to_integer_graph
        graph = to_integer_graph(model, flatbuffer=flatbuffer)
    if len(graph.inputs) != 1:
        raise ValueError(f"locate_divergence needs a single-input graph; this one has {len(graph.inputs)} inputs")
    matched = layer_tensors(model, graph)
    order = sorted(matched, key=lambda t: next(i for i, op in enumerate(graph.ops) if t in op["outputs"]))
    probe = keras.Model(model.inputs, [_layer_output(model, matched[t]) for t in order])
    x = np.asarray(x, np.float32)
    stats = {t: {"values": 0, "differing": 0, "beyond": 0, "max_steps": 0, "off_grid": 0.0} for t in order}
    for start in range(0, len(x), batch_size):
        chunk = x[start:start + batch_size]
        keras_out = probe.predict(chunk, verbose=0, batch_size=batch_size)
        keras_out = keras_out if isinstance(keras_out, list) else [keras_out]
        codes = {}
        for t, y in zip(order, keras_out):
            spec = graph.tensors[t]
            codes[t] = np.asarray(y, np.float64) / spec.s + spec.z
        env = {graph.inputs[0]: graph_input(graph, chunk)}
        for idx, op in enumerate(graph.ops):
            for t, out in zip(op["outputs"], graph.run_op(idx, env, arithmetic)):
                if t in codes:
                    kc = codes[t].reshape(out.shape)
                    forced = np.clip(np.rint(kc), -128, 127)
                    steps = np.abs(forced - out.astype(np.float64))
                    st = stats[t]
                    st["values"] += int(out.size)
                    st["differing"] += int(np.sum(steps > 0))
                    st["beyond"] += int(np.sum(steps > 1))
                    st["max_steps"] = max(st["max_steps"], int(steps.max(initial=0)))
                    st["off_grid"] = max(st["off_grid"], float(np.abs(kc - np.rint(kc)).max(initial=0.0)))
                    out = forced.astype(out.dtype)
                env[t] = out
    rows = []
    for t in order:
        idx = next(i for i, op in enumerate(graph.ops) if t in op["outputs"])
        st = stats[t]
        rows.append({"op_index": idx, "op": graph.ops[idx]["op"], "layer": matched[t].name,
                     "tensor": graph.tensors[t].name.split(";")[0],
                     "chain": ">".join(graph.ops[i]["op"] for i in _forced_chain(graph, idx, set(order))),
                     "values": st["values"], "differing": st["differing"] / max(st["values"], 1),
                     "beyond_one_step": st["beyond"] / max(st["values"], 1), "max_steps": st["max_steps"],
                     "off_grid": st["off_grid"]})
    return rows
