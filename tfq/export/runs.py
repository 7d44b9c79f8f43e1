"""Export a training run directory (``tfq train`` / ``tfq ptq`` output): TFLite or IntegerGraph
files, accuracy of Keras vs TFLite vs IntegerGraph on the test set, file sizes, parity report."""
from __future__ import annotations

import json
import os
import time

import numpy as np


def load_run_model(run_dir, name="quantized.h5"):
    import tf_keras as keras

    from tfq.api import quantize_scope
    path = run_dir if run_dir.endswith((".h5", ".keras")) or os.path.exists(os.path.join(run_dir, "saved_model.pb")) \
        else os.path.join(run_dir, name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: pass a run directory written by `tfq train` or "
                                "`tfq ptq` (holding quantized.h5) or the path of a saved quantized model")
    with quantize_scope():
        return keras.models.load_model(path, compile=False)


def run_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def tflite_accuracy(flatbuffer, x, y):
    from tfq.export.verify import run_tflite
    out, _ = run_tflite(flatbuffer, x)
    return float(np.mean(out.reshape(len(out), -1).argmax(1) == y))


def integer_graph_accuracy(graph, flatbuffer, x, y, batch=100):
    from tfq.export.verify import _interpreter, quantize_input
    detail = _interpreter(flatbuffer, reference=True).get_input_details()[0]
    predictions = []
    for start in range(0, len(x), batch):
        out = np.asarray(graph.run(quantize_input(x[start:start + batch], detail)))
        predictions.append(out.reshape(len(out), -1).argmax(1))
    return float(np.mean(np.concatenate(predictions) == y))


def float_tflite(float_model, path):
    """The float model as an fp32 TFLite file (the size and latency baseline); returns its size."""
    import tensorflow as tf
    flatbuffer = tf.lite.TFLiteConverter.from_keras_model(float_model).convert()
    with open(path, "wb") as f:
        f.write(flatbuffer)
    return len(flatbuffer)


def export_run(run_dir, fmt="tflite", int4_weights=False, dataset=None, evaluate=True, integer_limit=None,
               verify_examples=1000, out_dir=None, log=print, exact_hard_swish=False, approximate_piecewise=False):
    """Export ``run_dir``'s quantized model; returns (and writes to ``export.json``) a summary.
    ``exact_hard_swish``, ``approximate_piecewise``: see ``tfq.export.to_tflite`` (with the latter the
    IntegerGraph still holds split PWLQ layers exactly: ``tfq.export.to_integer_graph``)."""
    from tfq import data
    from tfq.export import tflite, verify
    if fmt not in ("tflite", "integer"):
        raise ValueError(f"format must be 'tflite' or 'integer', got {fmt!r}")
    out_dir = out_dir or (run_dir if os.path.isdir(run_dir) else os.path.dirname(run_dir))
    model = load_run_model(run_dir)
    dataset = dataset or run_metrics(run_dir).get("dataset", "fashion_mnist")
    start = time.perf_counter()
    int8 = tflite.to_tflite(model, os.path.join(out_dir, "model_int8.tflite"), exact_hard_swish=exact_hard_swish,
                            approximate_piecewise=approximate_piecewise)
    summary = {"run_dir": run_dir, "dataset": dataset, "format": fmt, "int8_bytes": len(int8),
               "exact_hard_swish": bool(exact_hard_swish), "approximate_piecewise": bool(approximate_piecewise),
               "export_seconds": time.perf_counter() - start,
               "layers": tflite.export_report(model, exact_hard_swish=exact_hard_swish,
                                              approximate_piecewise=approximate_piecewise)}
    if int4_weights:
        int4 = tflite.to_tflite(model, os.path.join(out_dir, "model_int4w.tflite"), int4_weights=True,
                                exact_hard_swish=exact_hard_swish, approximate_piecewise=approximate_piecewise)
        summary["int4_weights_bytes"] = len(int4)
    float_path = os.path.join(run_dir, "float.h5") if os.path.isdir(run_dir) else None
    if float_path and os.path.exists(float_path):
        summary["fp32_bytes"] = float_tflite(load_run_model(run_dir, "float.h5"),
                                             os.path.join(out_dir, "model_fp32.tflite"))
    if fmt == "integer" or evaluate:
        graph = tflite.to_integer_graph(model, flatbuffer=int8)  # exact parts for split PWLQ layers
        summary["kernel_parts_ops"] = len(graph.parts_ops())
    if fmt == "integer":
        summary["integer_graph_files"] = list(graph.save(os.path.join(out_dir, "integer_graph")))
    if evaluate:
        x, y = data.load_numpy(dataset, "test")
        from tfq.train import evaluate as keras_evaluate
        summary["keras_accuracy"] = keras_evaluate(model, dataset)
        summary["tflite_accuracy"] = tflite_accuracy(int8, x, y)
        n = len(x) if integer_limit is None else min(len(x), integer_limit)
        summary["integer_graph_accuracy"] = integer_graph_accuracy(graph, int8, x[:n], y[:n])
        summary["integer_graph_examples"] = int(n)
        summary["verify"] = verify.verify(model, int8, x[:verify_examples], graph=graph)
    with open(os.path.join(out_dir, "export.json"), "w") as f:
        json.dump(summary, f, indent=1)
    log(format_summary(summary))
    return summary


def format_summary(s):
    lines = [f"export of {s['run_dir']} ({s['format']})"]
    if "keras_accuracy" in s:
        lines.append(f"  test accuracy  Keras {s['keras_accuracy']:.4f} | TFLite {s['tflite_accuracy']:.4f} | "
                     f"IntegerGraph {s['integer_graph_accuracy']:.4f} ({s['integer_graph_examples']} examples)")
        v = s["verify"]["xnnpack"]
        lines.append(f"  parity (TFLite XNNPACK vs Keras, {s['verify']['examples']} examples): "
                     f"{100 * v['within_one_step']:.2f}% of outputs within one step, max "
                     f"{v['max_step_difference']:.2f} steps; IntegerGraph bit-exact with reference kernels: "
                     f"{s['verify']['integer_graph_vs_reference']['bit_exact']}")
        if s.get("kernel_parts_ops"):
            g = s["verify"]["integer_graph"]
            lines.append(f"  {s['kernel_parts_ops']} split PWLQ op(s) exact in the IntegerGraph only (TFLite holds "
                         f"an approximation): IntegerGraph vs Keras {100 * g['within_one_step']:.2f}% within one "
                         f"step, argmax agreement {g['argmax_agreement']}")
    sizes = [f"int8 {s['int8_bytes'] / 1024:.1f} KiB"]
    if "fp32_bytes" in s:
        sizes.insert(0, f"fp32 {s['fp32_bytes'] / 1024:.1f} KiB")
        sizes.append(f"({s['fp32_bytes'] / s['int8_bytes']:.2f}x smaller)")
    if "int4_weights_bytes" in s:
        sizes.append(f"int4-weights {s['int4_weights_bytes'] / 1024:.1f} KiB")
    lines.append("  file sizes  " + " | ".join(sizes))
    return "\n".join(lines)
