"""Parity of an exported model: Keras quantized model vs TFLite (XNNPACK and reference kernels)
vs IntegerGraph, measured in output steps (SPEC "Export rules", acceptance).

A graph with kernel-parts ops (split PWLQ layers, ``IntegerGraph`` module docstring) differs from
the TFLite reference kernels by design (TFLite holds an approximation of those layers), so it is
compared with the Keras model directly (``report["integer_graph"]``) and ``passes`` judges it that way."""
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
    margin exceeds two steps; the same for the IntegerGraph against Keras (``integer_graph``);
    IntegerGraph vs reference kernels: exact-match count and the number of kernel-parts ops (not
    expected to match when > 0); XNNPACK partitions and ops left outside XNNPACK. Without ``graph``
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
    coverage = bench.xnnpack_coverage(xnn_interp._get_ops_details())
    report = {
        "examples": int(len(x)),
        "output_scale": float(out_detail["quantization"][0]),
        "xnnpack": _compare(keras_steps, tflite_steps(xnn, out_detail)),
        "reference": _compare(keras_steps, tflite_steps(ref, out_detail)),
        "integer_graph": _compare(keras_steps, tflite_steps(ig, out_detail)),
        "integer_graph_vs_reference": {"exact_matches": int(np.sum(ig == ref)), "values": int(ref.size),
                                       "bit_exact": bool(np.array_equal(ig, ref)),
                                       "kernel_parts_ops": len(graph.parts_ops())},
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
    itself must meet the acceptance against Keras instead."""
    if report["integer_graph_vs_reference"].get("kernel_parts_ops"):
        return _accepts(report["integer_graph"], within, argmax)
    return _accepts(report["xnnpack"], within, argmax) and report["integer_graph_vs_reference"]["bit_exact"]
